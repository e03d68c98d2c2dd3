// Package dfs is an idiomatic Go client for the dfs gRPC API.
//
// It wraps the generated stubs in package dfsv1 and streams file contents in
// both directions through io.Reader and io.Writer, so no call holds a whole
// file in memory. Errors returned by the node keep their gRPC status code:
// status.Code(err) and errors such as codes.NotFound work as usual.
//
//	c, err := dfs.Dial("127.0.0.1:7070", dfs.WithToken("secret"))
//	if err != nil { ... }
//	// Over TLS, with a client certificate for a node that requires one:
//	c, err = dfs.Dial("dfs.example:50051", dfs.WithTLS("ca.pem", "client.pem", "client.key"))
//	defer c.Close()
//	info, err := c.Upload(ctx, "photos/cat.jpg", file)
package dfs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/dfs-storage/dfs/clients/go/dfsv1"
)

// DefaultChunkSize is the size of the data messages an upload sends. The
// node accepts data messages of at most 1 MiB.
const DefaultChunkSize = 256 * 1024

// MaxChunkSize is the largest data message the client will send.
const MaxChunkSize = 1024 * 1024

// Version orders writes of one key: the larger hybrid logical clock wins.
type Version struct {
	HLC    uint64
	NodeID string
}

// ObjectInfo describes a stored object.
type ObjectInfo struct {
	Key         string
	Size        uint64
	SHA1        string // lowercase hex SHA-1 of the whole file
	ChunkCount  uint32
	ChunkSize   uint32
	ContentType string
	Metadata    map[string]string
	Created     time.Time
	Version     Version
}

func infoFromProto(p *dfsv1.ObjectInfo) *ObjectInfo {
	if p == nil {
		return nil
	}
	info := &ObjectInfo{
		Key:         p.GetKey(),
		Size:        p.GetSize(),
		SHA1:        p.GetSha1(),
		ChunkCount:  p.GetChunkCount(),
		ChunkSize:   p.GetChunkSize(),
		ContentType: p.GetContentType(),
		Metadata:    p.GetMetadata(),
		Created:     time.UnixMilli(int64(p.GetCreatedUnixMs())),
	}
	if v := p.GetVersion(); v != nil {
		info.Version = Version{HLC: v.GetHlc(), NodeID: v.GetNodeId()}
	}
	return info
}

// Option configures Dial.
type Option func(*options)

type options struct {
	token      string
	creds      credentials.TransportCredentials
	tls        *tlsFiles
	serverName string
	chunkSize  int
	dialOpts   []grpc.DialOption
	err        error
}

// WithToken sends "authorization: Bearer <token>" with every call.
func WithToken(token string) Option {
	return func(o *options) { o.token = token }
}

// WithTokenFile reads the bearer token from a file (surrounding whitespace is
// ignored). A file that cannot be read makes Dial fail.
func WithTokenFile(path string) Option {
	return func(o *options) {
		b, err := os.ReadFile(path)
		if err != nil {
			o.err = fmt.Errorf("dfs: reading token file: %w", err)
			return
		}
		o.token = strings.TrimSpace(string(b))
	}
}

// WithTransportCredentials uses TLS (or other) credentials instead of a
// plaintext connection.
func WithTransportCredentials(c credentials.TransportCredentials) Option {
	return func(o *options) { o.creds = c }
}

// tlsFiles names the PEM files of WithTLS; they are read by Dial.
type tlsFiles struct{ ca, cert, key string }

// WithTLS connects over TLS. caFile holds the CA certificates that signed
// the node's certificate (PEM; "" trusts the system's roots). certFile and
// keyFile are a client certificate and its key (PEM; both "" for none), for
// nodes started with --tls-client-ca-file. A file that cannot be read or
// parsed makes Dial fail.
func WithTLS(caFile, certFile, keyFile string) Option {
	return func(o *options) { o.tls = &tlsFiles{ca: caFile, cert: certFile, key: keyFile} }
}

// WithServerName sets the name the node's certificate must hold, when it
// differs from the host in the address (a port-forward to 127.0.0.1, say).
func WithServerName(name string) Option {
	return func(o *options) { o.serverName = name }
}

func (f *tlsFiles) config(serverName string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: serverName}
	if f.ca != "" {
		pem, err := os.ReadFile(f.ca)
		if err != nil {
			return nil, fmt.Errorf("dfs: reading CA file: %w", err)
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("dfs: CA file %s holds no PEM certificate", f.ca)
		}
	}
	if (f.cert == "") != (f.key == "") {
		return nil, errors.New("dfs: WithTLS needs both a client certificate and its key, or neither")
	}
	if f.cert != "" {
		pair, err := tls.LoadX509KeyPair(f.cert, f.key)
		if err != nil {
			return nil, fmt.Errorf("dfs: loading client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

// WithChunkSize sets the size of upload data messages (1..MaxChunkSize).
func WithChunkSize(n int) Option {
	return func(o *options) {
		if n > 0 && n <= MaxChunkSize {
			o.chunkSize = n
		}
	}
}

// WithDialOptions passes extra options to grpc.NewClient.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dialOpts = append(o.dialOpts, opts...) }
}

// bearer implements credentials.PerRPCCredentials.
type bearer struct {
	token  string
	secure bool
}

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

func (b bearer) RequireTransportSecurity() bool { return b.secure }

// Client talks to one dfs node. It is safe for concurrent use.
type Client struct {
	conn      *grpc.ClientConn
	storage   dfsv1.StorageClient
	cluster   dfsv1.ClusterClient
	chunkSize int
}

// Dial connects to a node at addr ("host:port"). The connection is made
// lazily; the first call reports an unreachable node.
func Dial(addr string, opts ...Option) (*Client, error) {
	o := options{chunkSize: DefaultChunkSize}
	for _, opt := range opts {
		opt(&o)
	}
	if o.err != nil {
		return nil, o.err
	}
	if o.tls != nil || o.serverName != "" {
		if o.creds != nil {
			return nil, errors.New("dfs: WithTLS and WithTransportCredentials exclude each other")
		}
		files := o.tls
		if files == nil {
			files = &tlsFiles{}
		}
		cfg, err := files.config(o.serverName)
		if err != nil {
			return nil, err
		}
		o.creds = credentials.NewTLS(cfg)
	}
	secure := o.creds != nil
	if o.creds == nil {
		o.creds = insecure.NewCredentials()
	}
	dialOpts := []grpc.DialOption{grpc.WithTransportCredentials(o.creds)}
	if o.token != "" {
		dialOpts = append(dialOpts, grpc.WithPerRPCCredentials(bearer{token: o.token, secure: secure}))
	}
	dialOpts = append(dialOpts, o.dialOpts...)
	conn, err := grpc.NewClient(addr, dialOpts...)
	if err != nil {
		return nil, err
	}
	return &Client{
		conn:      conn,
		storage:   dfsv1.NewStorageClient(conn),
		cluster:   dfsv1.NewClusterClient(conn),
		chunkSize: o.chunkSize,
	}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Storage returns the generated Storage stub, for calls the wrapper lacks.
func (c *Client) Storage() dfsv1.StorageClient { return c.storage }

// Cluster returns the generated Cluster stub.
func (c *Client) Cluster() dfsv1.ClusterClient { return c.cluster }

// UploadOption sets optional fields of an upload's header.
type UploadOption func(*dfsv1.UploadHeader)

// ContentType sets the object's MIME type.
func ContentType(t string) UploadOption {
	return func(h *dfsv1.UploadHeader) { h.ContentType = t }
}

// ExpectedSHA1 makes the node reject the upload with DATA_LOSS unless the
// data hashes to sha1 (lowercase hex).
func ExpectedSHA1(sha1 string) UploadOption {
	return func(h *dfsv1.UploadHeader) { h.ExpectedSha1 = sha1 }
}

// Metadata attaches user metadata to the object.
func Metadata(md map[string]string) UploadOption {
	return func(h *dfsv1.UploadHeader) { h.Metadata = md }
}

// Upload stores everything r yields under key, streaming it in chunks. The
// object exists only if Upload returns nil; a read error aborts the upload
// and leaves no object behind.
func (c *Client) Upload(ctx context.Context, key string, r io.Reader, opts ...UploadOption) (*ObjectInfo, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	header := &dfsv1.UploadHeader{Key: key}
	for _, opt := range opts {
		opt(header)
	}
	stream, err := c.storage.Upload(ctx)
	if err != nil {
		return nil, err
	}
	send := func(m *dfsv1.UploadRequest) error {
		err := stream.Send(m)
		if errors.Is(err, io.EOF) {
			// The server ended the call: its status is in CloseAndRecv.
			_, err = stream.CloseAndRecv()
			if err == nil {
				err = errors.New("dfs: server closed the upload early")
			}
		}
		return err
	}
	if err := send(&dfsv1.UploadRequest{Msg: &dfsv1.UploadRequest_Header{Header: header}}); err != nil {
		return nil, err
	}
	for {
		// A fresh buffer per message: gRPC may still hold a sent message,
		// so it must not be modified after Send.
		buf := make([]byte, c.chunkSize)
		n, rerr := io.ReadFull(r, buf)
		if n > 0 {
			if err := send(&dfsv1.UploadRequest{Msg: &dfsv1.UploadRequest_Data{Data: buf[:n]}}); err != nil {
				return nil, err
			}
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			cancel() // abort the call so the node stores nothing
			return nil, fmt.Errorf("dfs: reading upload data for %q: %w", key, rerr)
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return nil, err
	}
	return infoFromProto(resp.GetObject()), nil
}

// UploadFile uploads the file at path under key.
func (c *Client) UploadFile(ctx context.Context, key, path string, opts ...UploadOption) (*ObjectInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return c.Upload(ctx, key, f, opts...)
}

// Download writes the whole object stored under key to w and returns its
// info. Every byte is verified by the node before it is sent.
func (c *Client) Download(ctx context.Context, key string, w io.Writer) (*ObjectInfo, error) {
	return c.DownloadRange(ctx, key, 0, 0, w)
}

// DownloadRange writes length bytes of the object starting at offset to w;
// length 0 means up to the end. A range starting past the end fails with
// OUT_OF_RANGE.
func (c *Client) DownloadRange(ctx context.Context, key string, offset, length uint64, w io.Writer) (*ObjectInfo, error) {
	return c.download(ctx, &dfsv1.DownloadRequest{
		Target: &dfsv1.DownloadRequest_Key{Key: key}, Offset: offset, Length: length,
	}, w)
}

// DownloadBySHA1 writes the object whose content hashes to sha1 to w.
func (c *Client) DownloadBySHA1(ctx context.Context, sha1 string, w io.Writer) (*ObjectInfo, error) {
	return c.download(ctx, &dfsv1.DownloadRequest{Target: &dfsv1.DownloadRequest_Sha1{Sha1: sha1}}, w)
}

func (c *Client) download(ctx context.Context, req *dfsv1.DownloadRequest, w io.Writer) (*ObjectInfo, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.storage.Download(ctx, req)
	if err != nil {
		return nil, err
	}
	var info *ObjectInfo
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return info, err
		}
		switch m := msg.GetMsg().(type) {
		case *dfsv1.DownloadResponse_Info:
			info = infoFromProto(m.Info)
		case *dfsv1.DownloadResponse_Data:
			if info == nil {
				return nil, errors.New("dfs: download stream sent data before info")
			}
			if _, err := w.Write(m.Data); err != nil {
				return info, fmt.Errorf("dfs: writing download data: %w", err)
			}
		}
	}
	if info == nil {
		return nil, errors.New("dfs: download stream ended without info")
	}
	return info, nil
}

// Stat describes the object stored under key.
func (c *Client) Stat(ctx context.Context, key string) (*ObjectInfo, error) {
	resp, err := c.storage.Stat(ctx, &dfsv1.StatRequest{Target: &dfsv1.StatRequest_Key{Key: key}})
	if err != nil {
		return nil, err
	}
	return infoFromProto(resp), nil
}

// ListPage returns one page of objects whose keys start with prefix, and the
// token of the next page ("" on the last page).
func (c *Client) ListPage(ctx context.Context, prefix string, pageSize uint32, pageToken string) ([]*ObjectInfo, string, error) {
	resp, err := c.storage.List(ctx, &dfsv1.ListRequest{Prefix: prefix, PageSize: pageSize, PageToken: pageToken})
	if err != nil {
		return nil, "", err
	}
	out := make([]*ObjectInfo, 0, len(resp.GetObjects()))
	for _, o := range resp.GetObjects() {
		out = append(out, infoFromProto(o))
	}
	return out, resp.GetNextPageToken(), nil
}

// List returns every object whose key starts with prefix, in key order,
// following pages until the last.
func (c *Client) List(ctx context.Context, prefix string) ([]*ObjectInfo, error) {
	var all []*ObjectInfo
	token := ""
	for {
		page, next, err := c.ListPage(ctx, prefix, 1000, token)
		if err != nil {
			return nil, err
		}
		all = append(all, page...)
		if next == "" {
			return all, nil
		}
		token = next
	}
}

// Delete removes the object stored under key.
func (c *Client) Delete(ctx context.Context, key string) error {
	_, err := c.storage.Delete(ctx, &dfsv1.DeleteRequest{Key: key})
	return err
}

// Status reports the node's view of itself and the cluster.
func (c *Client) Status(ctx context.Context) (*dfsv1.StatusResponse, error) {
	return c.cluster.Status(ctx, &dfsv1.StatusRequest{})
}

// ForgetMember removes a dead member from the cluster for good. It is an
// admin call: on a node that checks tokens it needs a token with role admin.
func (c *Client) ForgetMember(ctx context.Context, nodeID string) error {
	_, err := c.cluster.ForgetMember(ctx, &dfsv1.ForgetMemberRequest{NodeId: nodeID})
	return err
}
