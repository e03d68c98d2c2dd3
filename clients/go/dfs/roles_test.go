package dfs_test

// Scoped tokens: clients/run-tests.sh gives the auth node a token file with
// one token per role and sets DFS_TEST_READ_TOKEN, DFS_TEST_WRITE_TOKEN and
// DFS_TEST_TOKEN (admin) to files holding each.

import (
	"os"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/dfs-storage/dfs/clients/go/dfs"
)

func roleClient(t *testing.T, env string) *dfs.Client {
	t.Helper()
	addr := testAddr(t, "DFS_TEST_AUTH_ADDR")
	file := os.Getenv(env)
	if file == "" {
		t.Skipf("%s is not set", env)
	}
	return dial(t, addr, dfs.WithTokenFile(file))
}

func wantCode(t *testing.T, what string, err error, want codes.Code) {
	t.Helper()
	if status.Code(err) != want {
		t.Fatalf("%s: got %v, want %v", what, err, want)
	}
}

func TestRoles(t *testing.T) {
	ctx := testCtx(t)
	reader := roleClient(t, "DFS_TEST_READ_TOKEN")
	writer := roleClient(t, "DFS_TEST_WRITE_TOKEN")
	admin := roleClient(t, "DFS_TEST_TOKEN")
	key := keyPrefix + "roles/by-writer.txt"

	// read: Stat, List, Status pass auth; Upload and Delete do not.
	_, err := reader.Stat(ctx, key)
	wantCode(t, "Stat with a read token", err, codes.NotFound)
	if _, err := reader.List(ctx, keyPrefix); err != nil {
		t.Fatalf("List with a read token: %v", err)
	}
	if _, err := reader.Status(ctx); err != nil {
		t.Fatalf("Status with a read token: %v", err)
	}
	_, err = reader.Upload(ctx, key, strings.NewReader("no"))
	wantCode(t, "Upload with a read token", err, codes.PermissionDenied)
	if !strings.Contains(status.Convert(err).Message(), "role write") {
		t.Fatalf("the refusal does not name the role needed: %v", err)
	}

	// write: Upload and Delete; not membership changes.
	if _, err := writer.Upload(ctx, key, strings.NewReader("yes")); err != nil {
		t.Fatalf("Upload with a write token: %v", err)
	}
	wantCode(t, "Delete with a read token", reader.Delete(ctx, key), codes.PermissionDenied)
	if _, err := reader.Stat(ctx, key); err != nil {
		t.Fatalf("the refused Delete deleted: %v", err)
	}
	err = writer.ForgetMember(ctx, "no-such-node")
	wantCode(t, "ForgetMember with a write token", err, codes.PermissionDenied)
	if err := writer.Delete(ctx, key); err != nil {
		t.Fatalf("Delete with a write token: %v", err)
	}

	// admin: past auth, ForgetMember finds no such member.
	err = admin.ForgetMember(ctx, "no-such-node")
	wantCode(t, "ForgetMember with an admin token", err, codes.NotFound)
}
