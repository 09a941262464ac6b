// cripull: pull and unpack an image the way CRI does, through containerd's
// client library: client.Pull with WithPullUnpack runs containerd's unpacker,
// which asks the snapshotter for each layer with the containerd.io/snapshot.ref
// label (the remote-snapshot path). `ctr image pull` in containerd 1.6 unpacks
// through image.Unpack instead and never sends that label.
//
//	cripull --address SOCK [--namespace NS] [--snapshotter NAME] REF
//
// Built by cli/tests/containerd.rs in GOPATH mode against Debian's
// golang-github-containerd-containerd-dev (/usr/share/gocode), offline.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/remotes/docker"
)

func main() {
	addr := flag.String("address", "", "containerd socket")
	ns := flag.String("namespace", "default", "containerd namespace")
	sn := flag.String("snapshotter", "cstore", "snapshotter to unpack into")
	flag.Parse()
	if *addr == "" || flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: cripull --address SOCK [--namespace NS] [--snapshotter NAME] REF")
		os.Exit(2)
	}
	client, err := containerd.New(*addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "cripull:", err)
		os.Exit(1)
	}
	defer client.Close()
	ctx := namespaces.WithNamespace(context.Background(), *ns)
	// The test registries are plain HTTP on 127.0.0.1.
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(docker.WithPlainHTTP(docker.MatchAllHosts)),
	})
	img, err := client.Pull(ctx, flag.Arg(0),
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(*sn),
		containerd.WithResolver(resolver))
	if err != nil {
		fmt.Fprintln(os.Stderr, "cripull:", err)
		os.Exit(1)
	}
	fmt.Println(img.Name(), img.Target().Digest)
}
