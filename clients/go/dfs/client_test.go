package dfs_test

// These tests run against live nodes. clients/run-tests.sh starts them and
// sets DFS_TEST_ADDR (a node without auth), DFS_TEST_AUTH_ADDR (a node that
// requires a bearer token), DFS_TEST_TOKEN (the file holding that token) and
// DFS_TEST_DAMAGE_ADDR/DFS_TEST_DAMAGE_DATA (a node whose chunk files a test
// damages, and its data directory). When it also sets DFS_TEST_CA_FILE (and
// DFS_TEST_CERT_FILE and DFS_TEST_KEY_FILE), the nodes speak TLS (mutual
// TLS) and every test dials them that way.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/dfs-storage/dfs/clients/go/dfs"
)

const fileSize = 10 << 20

func testAddr(t *testing.T, env string) string {
	t.Helper()
	addr := os.Getenv(env)
	if addr == "" {
		t.Skipf("%s is not set; run clients/run-tests.sh to start a node", env)
	}
	return addr
}

// transportOpts is how this run reaches its nodes: TLS when
// clients/run-tests.sh says so, else plaintext.
func transportOpts() []dfs.Option {
	ca := os.Getenv("DFS_TEST_CA_FILE")
	if ca == "" {
		return nil
	}
	return []dfs.Option{dfs.WithTLS(ca, os.Getenv("DFS_TEST_CERT_FILE"), os.Getenv("DFS_TEST_KEY_FILE"))}
}

func dial(t *testing.T, addr string, opts ...dfs.Option) *dfs.Client {
	t.Helper()
	c, err := dfs.Dial(addr, append(transportOpts(), opts...)...)
	if err != nil {
		t.Fatalf("Dial(%s): %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// keyPrefix is unique per run so the Go, Python and TS tests can share a node
// and reruns do not collide.
var keyPrefix = fmt.Sprintf("go-test/%d/", time.Now().UnixNano())

// randomFile writes size random bytes to a temporary file and returns its
// path and SHA-1.
func randomFile(t *testing.T, size int) (string, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "random.bin")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha1.New()
	if _, err := io.CopyN(io.MultiWriter(f, h), rand.Reader, int64(size)); err != nil {
		t.Fatal(err)
	}
	return path, hex.EncodeToString(h.Sum(nil))
}

// hashWriter hashes what it is given and keeps a count, so a 10 MiB download
// never has to sit in memory.
type hashWriter struct {
	h interface {
		io.Writer
		Sum([]byte) []byte
	}
	n int64
}

func newHashWriter() *hashWriter { return &hashWriter{h: sha1.New()} }

func (w *hashWriter) Write(p []byte) (int, error) {
	w.n += int64(len(p))
	return w.h.Write(p)
}

func (w *hashWriter) hex() string { return hex.EncodeToString(w.h.Sum(nil)) }

func TestRoundTrip(t *testing.T) {
	c := dial(t, testAddr(t, "DFS_TEST_ADDR"))
	ctx := testCtx(t)
	path, want := randomFile(t, fileSize)
	key := keyPrefix + "roundtrip/big.bin"

	info, err := c.UploadFile(ctx, key, path, dfs.ContentType("application/octet-stream"),
		dfs.Metadata(map[string]string{"lang": "go"}))
	if err != nil {
		t.Fatalf("Upload: %v", err)
	}
	if info.Key != key || info.Size != fileSize || info.SHA1 != want {
		t.Fatalf("Upload info = %+v, want key %q size %d sha1 %s", info, key, fileSize, want)
	}

	// Whole download, hashed as it streams.
	hw := newHashWriter()
	dinfo, err := c.Download(ctx, key, hw)
	if err != nil {
		t.Fatalf("Download: %v", err)
	}
	if hw.n != fileSize || hw.hex() != want {
		t.Fatalf("Download got %d bytes sha1 %s, want %d bytes sha1 %s", hw.n, hw.hex(), fileSize, want)
	}
	if dinfo.SHA1 != want || dinfo.Size != fileSize {
		t.Fatalf("Download info = %+v", dinfo)
	}

	// Range downloads: a span crossing chunk boundaries, and length 0 (to the end).
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []struct{ off, n uint64 }{
		{0, 1}, {123_457, 3 << 20}, {fileSize - 1000, 0}, {fileSize - 1, 1},
	} {
		var buf bytes.Buffer
		if _, err := c.DownloadRange(ctx, key, r.off, r.n, &buf); err != nil {
			t.Fatalf("DownloadRange(%d, %d): %v", r.off, r.n, err)
		}
		end := r.off + r.n
		if r.n == 0 {
			end = fileSize
		}
		if !bytes.Equal(buf.Bytes(), data[r.off:end]) {
			t.Fatalf("DownloadRange(%d, %d): got %d bytes that differ from the file", r.off, r.n, buf.Len())
		}
	}
	if _, err := c.DownloadRange(ctx, key, fileSize+10, 5, io.Discard); status.Code(err) != codes.OutOfRange {
		t.Fatalf("DownloadRange past the end: got %v, want OUT_OF_RANGE", err)
	}

	// Download by content hash.
	hw = newHashWriter()
	if _, err := c.DownloadBySHA1(ctx, want, hw); err != nil || hw.hex() != want {
		t.Fatalf("DownloadBySHA1: err %v, sha1 %s", err, hw.hex())
	}

	st, err := c.Stat(ctx, key)
	if err != nil {
		t.Fatalf("Stat: %v", err)
	}
	if st.Size != fileSize || st.SHA1 != want || st.ContentType != "application/octet-stream" || st.Metadata["lang"] != "go" {
		t.Fatalf("Stat = %+v", st)
	}

	if err := c.Delete(ctx, key); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	_, err = c.Stat(ctx, key)
	if status.Code(err) != codes.NotFound {
		t.Fatalf("Stat after Delete: got %v, want NOT_FOUND", err)
	}
	_, err = c.Download(ctx, key, io.Discard)
	if status.Code(err) != codes.NotFound {
		t.Fatalf("Download after Delete: got %v, want NOT_FOUND", err)
	}
}

func TestListPrefix(t *testing.T) {
	c := dial(t, testAddr(t, "DFS_TEST_ADDR"))
	ctx := testCtx(t)
	prefix := keyPrefix + "list/"
	keys := []string{prefix + "a", prefix + "b/c", prefix + "d"}
	for i, k := range keys {
		if _, err := c.Upload(ctx, k, strings.NewReader(strings.Repeat("x", i+1))); err != nil {
			t.Fatalf("Upload %s: %v", k, err)
		}
	}
	if _, err := c.Upload(ctx, keyPrefix+"other", strings.NewReader("no")); err != nil {
		t.Fatal(err)
	}
	got, err := c.List(ctx, prefix)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	var gotKeys []string
	for _, o := range got {
		gotKeys = append(gotKeys, o.Key)
	}
	if strings.Join(gotKeys, ",") != strings.Join(keys, ",") {
		t.Fatalf("List(%q) = %v, want %v", prefix, gotKeys, keys)
	}
	// Paging with a small page size yields the same keys.
	var paged []string
	token := ""
	for {
		page, next, err := c.ListPage(ctx, prefix, 2, token)
		if err != nil {
			t.Fatalf("ListPage: %v", err)
		}
		if len(page) > 2 {
			t.Fatalf("ListPage returned %d objects for page size 2", len(page))
		}
		for _, o := range page {
			paged = append(paged, o.Key)
		}
		if next == "" {
			break
		}
		token = next
	}
	if strings.Join(paged, ",") != strings.Join(keys, ",") {
		t.Fatalf("paged List = %v, want %v", paged, keys)
	}
	for _, k := range append(keys, keyPrefix+"other") {
		if err := c.Delete(ctx, k); err != nil {
			t.Fatalf("Delete %s: %v", k, err)
		}
	}
}

func TestErrors(t *testing.T) {
	c := dial(t, testAddr(t, "DFS_TEST_ADDR"))
	ctx := testCtx(t)
	if _, err := c.Stat(ctx, keyPrefix+"missing"); status.Code(err) != codes.NotFound {
		t.Fatalf("Stat of a missing key: got %v, want NOT_FOUND", err)
	}
	if _, err := c.Upload(ctx, "", strings.NewReader("x")); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("Upload with empty key: got %v, want INVALID_ARGUMENT", err)
	}
	_, err := c.Upload(ctx, keyPrefix+"badsha", strings.NewReader("hello"),
		dfs.ExpectedSHA1(strings.Repeat("0", 40)))
	if status.Code(err) != codes.DataLoss {
		t.Fatalf("Upload with a wrong expected_sha1: got %v, want DATA_LOSS", err)
	}
	if _, err := c.Stat(ctx, keyPrefix+"badsha"); status.Code(err) != codes.NotFound {
		t.Fatalf("a failed upload left an object behind: %v", err)
	}
}

func TestStatus(t *testing.T) {
	c := dial(t, testAddr(t, "DFS_TEST_ADDR"))
	st, err := c.Status(testCtx(t))
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	if st.GetNodeId() == "" {
		t.Fatalf("Status has no node id: %v", st)
	}
}

func TestAuth(t *testing.T) {
	addr := testAddr(t, "DFS_TEST_AUTH_ADDR")
	tokenFile := os.Getenv("DFS_TEST_TOKEN")
	if tokenFile == "" {
		t.Skip("DFS_TEST_TOKEN is not set")
	}
	ctx := testCtx(t)

	good := dial(t, addr, dfs.WithTokenFile(tokenFile))
	key := keyPrefix + "auth/hello.txt"
	info, err := good.Upload(ctx, key, strings.NewReader("hello, auth"))
	if err != nil {
		t.Fatalf("Upload with the right token: %v", err)
	}
	var buf bytes.Buffer
	if _, err := good.Download(ctx, key, &buf); err != nil || buf.String() != "hello, auth" {
		t.Fatalf("Download with the right token: %q, %v", buf.String(), err)
	}

	wrong := dial(t, addr, dfs.WithToken("not-the-token"))
	if _, err := wrong.Stat(ctx, key); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("Stat with a wrong token: got %v, want UNAUTHENTICATED", err)
	}
	if _, err := wrong.Upload(ctx, key+".2", strings.NewReader("x")); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("Upload with a wrong token: got %v, want UNAUTHENTICATED", err)
	}
	none := dial(t, addr)
	if _, err := none.List(ctx, keyPrefix); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("List without a token: got %v, want UNAUTHENTICATED", err)
	}
	if err := good.Delete(ctx, info.Key); err != nil {
		t.Fatalf("Delete with the right token: %v", err)
	}
}

func TestTokenFileMissing(t *testing.T) {
	_, err := dfs.Dial("127.0.0.1:1", dfs.WithTokenFile(filepath.Join(t.TempDir(), "nope")))
	if err == nil {
		t.Fatal("Dial with a missing token file succeeded")
	}
}

// failingReader yields some data, then fails.
type failingReader struct{ n int }

func (r *failingReader) Read(p []byte) (int, error) {
	if r.n >= 3 {
		return 0, errors.New("disk on fire")
	}
	r.n++
	for i := range p {
		p[i] = 'y'
	}
	return len(p), nil
}

func TestFailedReadAbortsUpload(t *testing.T) {
	c := dial(t, testAddr(t, "DFS_TEST_ADDR"))
	ctx := testCtx(t)
	key := keyPrefix + "broken"
	_, err := c.Upload(ctx, key, &failingReader{})
	if err == nil || !strings.Contains(err.Error(), "disk on fire") {
		t.Fatalf("Upload from a failing reader: got %v, want the read error", err)
	}
	if _, err := c.Stat(ctx, key); status.Code(err) != codes.NotFound {
		t.Fatalf("a failed upload left an object behind: %v", err)
	}
}

// chunkFiles lists the chunk files under a node's data directory.
func chunkFiles(t *testing.T, dataDir string) map[string]bool {
	t.Helper()
	files := map[string]bool{}
	err := filepath.WalkDir(filepath.Join(dataDir, "chunks"), func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			files[p] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// uploadNewChunk uploads data under key and returns the one chunk file the
// upload added to the node's disk.
func uploadNewChunk(t *testing.T, c *dfs.Client, dataDir, key string, data []byte) string {
	t.Helper()
	before := chunkFiles(t, dataDir)
	if _, err := c.Upload(testCtx(t), key, bytes.NewReader(data)); err != nil {
		t.Fatalf("Upload(%s): %v", key, err)
	}
	var added []string
	for f := range chunkFiles(t, dataDir) {
		if !before[f] {
			added = append(added, f)
		}
	}
	if len(added) != 1 {
		t.Fatalf("upload of %s added %d chunk files, want 1: %v", key, len(added), added)
	}
	return added[0]
}

// A chunk that fails verification in the middle of a download (a node with
// no peers: DATA_LOSS after the first chunk's bytes were sent) must reach
// the caller as an error, never as a short success.
func TestErrorAfterDataHasStarted(t *testing.T) {
	addr := testAddr(t, "DFS_TEST_DAMAGE_ADDR")
	dataDir := os.Getenv("DFS_TEST_DAMAGE_DATA")
	if dataDir == "" {
		t.Fatal("DFS_TEST_DAMAGE_DATA is not set")
	}
	c := dial(t, addr)
	const chunk = 1 << 20 // the node's --chunk-size
	first := make([]byte, chunk)
	second := make([]byte, chunk)
	rand.Read(first)
	rand.Read(second)
	// The first chunk is stored by an object of its own, so the second
	// object adds exactly one new chunk file: its second chunk.
	uploadNewChunk(t, c, dataDir, keyPrefix+"midstream-head", first)
	victim := uploadNewChunk(t, c, dataDir, keyPrefix+"midstream", append(append([]byte{}, first...), second...))
	raw, err := os.ReadFile(victim)
	if err != nil {
		t.Fatal(err)
	}
	raw[len(raw)/2] ^= 0x40
	if err := os.WriteFile(victim, raw, 0o644); err != nil {
		t.Fatal(err)
	}

	var got bytes.Buffer
	info, err := c.Download(testCtx(t), keyPrefix+"midstream", &got)
	if err == nil {
		t.Fatalf("download with a damaged second chunk succeeded with %d bytes", got.Len())
	}
	if code := status.Code(err); code != codes.DataLoss {
		t.Fatalf("error code %v, want DataLoss: %v", code, err)
	}
	if got.Len() != chunk || !bytes.Equal(got.Bytes(), first) {
		t.Fatalf("before the error the writer got %d bytes, want the first chunk (%d): data had not started, or was wrong", got.Len(), chunk)
	}
	if info != nil && info.Size != 2*chunk {
		t.Fatalf("info size %d", info.Size)
	}
}
