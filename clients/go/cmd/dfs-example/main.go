// Command dfs-example is a small command-line client built on package dfs.
//
//	dfs-example -addr 127.0.0.1:7070 put photos/cat.jpg ./cat.jpg
//	dfs-example -addr 127.0.0.1:7070 get photos/cat.jpg ./copy.jpg
//	dfs-example -addr 127.0.0.1:7070 get -offset 100 -length 10 photos/cat.jpg -
//	dfs-example -addr 127.0.0.1:7070 stat photos/cat.jpg
//	dfs-example -addr 127.0.0.1:7070 ls photos/
//	dfs-example -addr 127.0.0.1:7070 rm photos/cat.jpg
//	dfs-example -addr 127.0.0.1:7070 status
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"time"

	"google.golang.org/grpc/status"

	"github.com/dfs-storage/dfs/clients/go/dfs"
)

func main() {
	addr := flag.String("addr", envOr("DFS_ADDR", "127.0.0.1:7070"), "gRPC address of a dfs node (env DFS_ADDR)")
	tokenFile := flag.String("token-file", os.Getenv("DFS_TOKEN_FILE"), "file holding the bearer token (env DFS_TOKEN_FILE)")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: %s [-addr host:port] [-token-file f] put KEY FILE|- | get [-offset N] [-length N] KEY FILE|- | stat KEY | ls [PREFIX] | rm KEY | status\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() < 1 {
		flag.Usage()
		os.Exit(2)
	}
	var opts []dfs.Option
	if *tokenFile != "" {
		opts = append(opts, dfs.WithTokenFile(*tokenFile))
	}
	c, err := dfs.Dial(*addr, opts...)
	if err != nil {
		fail(err)
	}
	defer c.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()

	args := flag.Args()
	switch cmd, rest := args[0], args[1:]; cmd {
	case "put":
		need(rest, 2)
		in := io.Reader(os.Stdin)
		if rest[1] != "-" {
			f, err := os.Open(rest[1])
			if err != nil {
				fail(err)
			}
			defer f.Close()
			in = f
		}
		info, err := c.Upload(ctx, rest[0], in)
		if err != nil {
			fail(err)
		}
		printInfo(info)
	case "get":
		fs := flag.NewFlagSet("get", flag.ExitOnError)
		offset := fs.Uint64("offset", 0, "first byte")
		length := fs.Uint64("length", 0, "number of bytes (0: to the end)")
		fs.Parse(rest)
		need(fs.Args(), 2)
		out := io.Writer(os.Stdout)
		if p := fs.Arg(1); p != "-" {
			f, err := os.Create(p)
			if err != nil {
				fail(err)
			}
			defer f.Close()
			out = f
		}
		if _, err := c.DownloadRange(ctx, fs.Arg(0), *offset, *length, out); err != nil {
			fail(err)
		}
	case "stat":
		need(rest, 1)
		info, err := c.Stat(ctx, rest[0])
		if err != nil {
			fail(err)
		}
		printInfo(info)
	case "ls":
		prefix := ""
		if len(rest) > 0 {
			prefix = rest[0]
		}
		objs, err := c.List(ctx, prefix)
		if err != nil {
			fail(err)
		}
		for _, o := range objs {
			fmt.Printf("%s  %12d  %s\n", o.SHA1, o.Size, o.Key)
		}
	case "rm":
		need(rest, 1)
		if err := c.Delete(ctx, rest[0]); err != nil {
			fail(err)
		}
	case "status":
		st, err := c.Status(ctx)
		if err != nil {
			fail(err)
		}
		fmt.Printf("node %s (%s) version %s: %d objects, %d chunks, %d bytes, %d members\n",
			st.GetNodeId(), st.GetGrpcAddress(), st.GetVersion(), st.GetObjectCount(),
			st.GetChunkCount(), st.GetBytesStored(), len(st.GetMembers()))
	default:
		flag.Usage()
		os.Exit(2)
	}
}

func printInfo(i *dfs.ObjectInfo) {
	fmt.Printf("key:      %s\nsize:     %d\nsha1:     %s\nchunks:   %d x %d\ntype:     %s\ncreated:  %s\n",
		i.Key, i.Size, i.SHA1, i.ChunkCount, i.ChunkSize, i.ContentType, i.Created.Format(time.RFC3339))
	for k, v := range i.Metadata {
		fmt.Printf("meta:     %s=%s\n", k, v)
	}
}

func need(args []string, n int) {
	if len(args) < n {
		flag.Usage()
		os.Exit(2)
	}
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func fail(err error) {
	if s, ok := status.FromError(err); ok {
		fmt.Fprintf(os.Stderr, "dfs-example: %s: %s\n", s.Code(), s.Message())
	} else {
		fmt.Fprintf(os.Stderr, "dfs-example: %v\n", err)
	}
	os.Exit(1)
}
