package dfs_test

// TLS: clients/run-tests.sh starts a node that speaks TLS
// (DFS_TEST_TLS_ADDR) and one that also requires a client certificate
// (DFS_TEST_MTLS_ADDR), with certificates it makes at start in DFS_TEST_PKI:
// ca.pem (signed both nodes' certificates), other-ca.pem (signed nothing of
// theirs), client.pem/client.key (from the CA the mTLS node trusts) and
// stranger.pem/stranger.key (from another CA).

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/dfs-storage/dfs/clients/go/dfs"
)

func pki(t *testing.T, name string) string {
	t.Helper()
	dir := os.Getenv("DFS_TEST_PKI")
	if dir == "" {
		t.Skip("DFS_TEST_PKI is not set; run clients/run-tests.sh")
	}
	return filepath.Join(dir, name)
}

// statusErr dials addr with opts and returns the error of a Status call:
// the first call runs the whole TLS handshake.
func statusErr(t *testing.T, addr string, opts ...dfs.Option) error {
	t.Helper()
	c, err := dfs.Dial(addr, opts...)
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Status(testCtx(t))
	return err
}

func TestTLS(t *testing.T) {
	addr := testAddr(t, "DFS_TEST_TLS_ADDR")
	ca := pki(t, "ca.pem")
	if err := statusErr(t, addr, dfs.WithTLS(ca, "", "")); err != nil {
		t.Fatalf("Status over TLS with the right CA: %v", err)
	}
	if err := statusErr(t, addr, dfs.WithTLS(pki(t, "other-ca.pem"), "", "")); err == nil {
		t.Fatal("Status over TLS trusting another CA succeeded")
	}
	if err := statusErr(t, addr); err == nil {
		t.Fatal("a plaintext Status on the TLS port succeeded")
	}
	if _, err := dfs.Dial(addr, dfs.WithTLS(filepath.Join(t.TempDir(), "nope.pem"), "", "")); err == nil {
		t.Fatal("Dial with a missing CA file succeeded")
	}
}

func TestMutualTLS(t *testing.T) {
	addr := testAddr(t, "DFS_TEST_MTLS_ADDR")
	ca := pki(t, "ca.pem")
	if err := statusErr(t, addr, dfs.WithTLS(ca, pki(t, "client.pem"), pki(t, "client.key"))); err != nil {
		t.Fatalf("Status with a client certificate from the node's client CA: %v", err)
	}
	if err := statusErr(t, addr, dfs.WithTLS(ca, "", "")); err == nil {
		t.Fatal("Status without a client certificate succeeded")
	}
	if err := statusErr(t, addr, dfs.WithTLS(ca, pki(t, "stranger.pem"), pki(t, "stranger.key"))); err == nil {
		t.Fatal("Status with a client certificate from another CA succeeded")
	}
	if _, err := dfs.Dial(addr, dfs.WithTLS(ca, pki(t, "client.pem"), "")); err == nil {
		t.Fatal("Dial with a certificate but no key succeeded")
	}
}
