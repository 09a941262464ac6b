// snaplat: latency of Prepare + Commit + Remove at the top of a chain of
// committed snapshots, through containerd's own proxy snapshotter client
// (snapshots/proxy over gRPC on a unix socket, as containerd talks to a proxy
// plugin), for several snapshotters served the same way, in one run.
//
//	snaplat [--iterations N] [--depths 1,2,4] NAME=SOCKET [NAME=SOCKET...]
//
// For each depth and snapshotter it builds a chain of that many committed
// layers (each Prepared, mounted, given a small file, unmounted and
// Committed, as an unpack does), then times N rounds of Prepare(top) +
// Commit + Remove. No mounts in the timed rounds: containerd's snapshotter
// calls do not mount, its callers do. Rounds run in blocks that alternate
// between the snapshotters, so background noise hits them alike. Prints the
// median microseconds of each call and the ratio of the first snapshotter
// to the second.
//
// Built by benches/snapshotter.sh in GOPATH mode against Debian's
// golang-github-containerd-containerd-dev (/usr/share/gocode), offline.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"google.golang.org/grpc"
)

type target struct {
	name string
	sn   snapshots.Snapshotter
	conn *grpc.ClientConn
}

// The calls timed in each round, in order.
var ops = []string{"prepare", "commit", "remove", "total"}

func main() {
	iterations := flag.Int("iterations", 200, "timed rounds per depth and snapshotter")
	depthList := flag.String("depths", "1,2,4,8,16,32,64", "chain depths")
	block := flag.Int("block", 10, "rounds per turn before switching snapshotter")
	flag.Parse()
	if flag.NArg() < 1 {
		fmt.Fprintln(os.Stderr, "usage: snaplat [--iterations N] [--depths 1,2,4] NAME=SOCKET...")
		os.Exit(2)
	}
	var depths []int
	for _, d := range strings.Split(*depthList, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(d))
		check(err)
		depths = append(depths, n)
	}
	var targets []*target
	for _, a := range flag.Args() {
		name, sock, ok := strings.Cut(a, "=")
		if !ok {
			check(fmt.Errorf("%q: want NAME=SOCKET", a))
		}
		conn, err := grpc.Dial("unix://"+sock, grpc.WithInsecure())
		check(err)
		defer conn.Close()
		targets = append(targets, &target{name, proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), name), conn})
	}
	ctx := context.Background()
	// Names unique to this run, so a root can be measured twice.
	run := strconv.FormatInt(time.Now().UnixNano()%1e9, 36)

	// results[depth][target][op] = durations
	results := map[int][]map[string][]time.Duration{}
	for _, depth := range depths {
		tops := make([]string, len(targets))
		per := make([]map[string][]time.Duration, len(targets))
		for i, t := range targets {
			tops[i] = buildChain(ctx, t.sn, fmt.Sprintf("%s-d%d", run, depth), depth)
			per[i] = map[string][]time.Duration{}
			// Warm up: connection, caches.
			for j := 0; j < 5; j++ {
				round(ctx, t.sn, tops[i], fmt.Sprintf("%s-d%d-warm-%d", run, depth, j))
			}
		}
		for done := 0; done < *iterations; done += *block {
			for i, t := range targets {
				for j := done; j < done+*block && j < *iterations; j++ {
					d := round(ctx, t.sn, tops[i], fmt.Sprintf("%s-d%d-r%d", run, depth, j))
					for k, op := range ops {
						per[i][op] = append(per[i][op], d[k])
					}
				}
			}
		}
		results[depth] = per
		fmt.Fprintf(os.Stderr, "depth %d done\n", depth)
	}

	fmt.Printf("median µs per call, %d rounds per depth (Prepare on the top of the chain, Commit, Remove)\n", *iterations)
	fmt.Printf("%-6s %-8s", "depth", "call")
	for _, t := range targets {
		fmt.Printf(" %12s", t.name)
	}
	if len(targets) >= 2 {
		fmt.Printf(" %8s", "ratio")
	}
	fmt.Println()
	for _, depth := range depths {
		for _, op := range ops {
			fmt.Printf("%-6d %-8s", depth, op)
			var meds []float64
			for i := range targets {
				m := median(results[depth][i][op])
				meds = append(meds, m)
				fmt.Printf(" %12.0f", m)
			}
			if len(meds) >= 2 {
				fmt.Printf(" %8.2f", meds[0]/meds[1])
			}
			fmt.Println()
		}
	}
}

// buildChain commits `depth` layers, each with one small file, and returns
// the top layer's name.
func buildChain(ctx context.Context, sn snapshots.Snapshotter, prefix string, depth int) string {
	parent := ""
	for i := 0; i < depth; i++ {
		key := fmt.Sprintf("%s-unpack-%d", prefix, i)
		mounts, err := sn.Prepare(ctx, key, parent)
		check(err)
		check(mount.WithTempMount(ctx, mounts, func(root string) error {
			return os.WriteFile(filepath.Join(root, fmt.Sprintf("layer-%d", i)), []byte(key), 0o644)
		}))
		name := fmt.Sprintf("%s-layer-%d", prefix, i)
		check(sn.Commit(ctx, name, key))
		parent = name
	}
	return parent
}

// round times Prepare(top) + Commit + Remove: prepare, commit, remove, total.
func round(ctx context.Context, sn snapshots.Snapshotter, top, key string) [4]time.Duration {
	t0 := time.Now()
	_, err := sn.Prepare(ctx, key, top)
	check(err)
	t1 := time.Now()
	check(sn.Commit(ctx, key+"-committed", key))
	t2 := time.Now()
	check(sn.Remove(ctx, key+"-committed"))
	t3 := time.Now()
	return [4]time.Duration{t1.Sub(t0), t2.Sub(t1), t3.Sub(t2), t3.Sub(t0)}
}

func median(ds []time.Duration) float64 {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	n := len(s)
	if n == 0 {
		return 0
	}
	if n%2 == 1 {
		return float64(s[n/2]) / 1e3
	}
	return float64(s[n/2-1]+s[n/2]) / 2e3
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "snaplat:", err)
		os.Exit(1)
	}
}
