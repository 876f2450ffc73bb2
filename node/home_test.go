package node

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"
)

func TestInitCreatesHome(t *testing.T) {
	home := filepath.Join(t.TempDir(), "h")
	res, err := Init(home, false)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(home, IdentityFile))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("identity mode %v, want 0600", st.Mode().Perm())
	}
	key, err := LoadIdentity(home)
	if err != nil {
		t.Fatal(err)
	}
	if id, _ := peer.IDFromPrivateKey(key); id != res.PeerID {
		t.Errorf("loaded identity %s, init said %s", id, res.PeerID)
	}
	if _, err := LoadConfig(filepath.Join(home, ConfigFile)); err != nil {
		t.Errorf("config written by init does not load: %v", err)
	}
}

func TestInitRefusesToOverwrite(t *testing.T) {
	home := t.TempDir()
	first, err := Init(home, false)
	if err != nil {
		t.Fatal(err)
	}
	keyBefore, _ := os.ReadFile(filepath.Join(home, IdentityFile))
	if _, err := Init(home, false); !errors.Is(err, ErrExists) || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("second init: %v, want ErrExists mentioning --force", err)
	}
	keyAfter, _ := os.ReadFile(filepath.Join(home, IdentityFile))
	if !bytes.Equal(keyBefore, keyAfter) {
		t.Fatal("refused init changed the identity")
	}

	second, err := Init(home, true)
	if err != nil {
		t.Fatal(err)
	}
	if second.PeerID == first.PeerID {
		t.Fatal("--force kept the old identity")
	}
	if len(second.Backups) != 2 {
		t.Fatalf("backups = %v, want identity and config", second.Backups)
	}
	for _, b := range second.Backups {
		if strings.Contains(b, IdentityFile) {
			if got, _ := os.ReadFile(b); !bytes.Equal(got, keyBefore) {
				t.Fatal("backup does not hold the old identity")
			}
		}
	}
}

func TestLoadIdentityErrors(t *testing.T) {
	home := t.TempDir()
	if _, err := LoadIdentity(home); !errors.Is(err, ErrNotInitialized) {
		t.Errorf("missing key: %v", err)
	}
	if err := os.WriteFile(filepath.Join(home, IdentityFile), []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := LoadIdentity(home)
	if !errors.Is(err, ErrBadKey) || !strings.Contains(err.Error(), IdentityFile) {
		t.Errorf("corrupt key: %v", err)
	}
}

func TestHomeLock(t *testing.T) {
	home := t.TempDir()
	release, err := lockHome(home)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lockHome(home); !errors.Is(err, ErrLocked) {
		t.Fatalf("second lock: %v, want ErrLocked", err)
	}
	if err := release(); err != nil {
		t.Fatal(err)
	}
	release, err = lockHome(home)
	if err != nil {
		t.Fatalf("lock after release: %v", err)
	}
	release()
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	for _, s := range []string{"one", "two"} {
		if err := WriteFileAtomic(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		if got, _ := os.ReadFile(p); string(got) != s {
			t.Fatalf("content %q, want %q", got, s)
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("temp files left behind: %v", entries)
	}
}

// The control API on a Unix socket: the home's api file names it, and the
// status, state and ledger clients reach the node through it.
func TestControlAPIOnUnixSocket(t *testing.T) {
	home := t.TempDir()
	if _, err := Init(home, false); err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.P2P.Listen = []string{"/ip4/127.0.0.1/tcp/0"}
	cfg.P2P.NAT.PortMap, cfg.P2P.NAT.AutoNAT, cfg.P2P.NAT.RelayService = false, false, "off"
	sock := filepath.Join(home, "api.sock")
	cfg.API.Listen = "unix:" + sock
	n, err := New(cfg, WithHome(home), WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if err := n.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	addr, err := ReadAPIAddr(home)
	if err != nil || addr != "unix:"+sock {
		t.Fatalf("api file: %q %v", addr, err)
	}
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket %v %v", fi, err)
	}
	st, err := FetchStatus(context.Background(), addr)
	if err != nil || st.PeerID != n.ID().String() {
		t.Fatalf("status over the socket: %+v %v", st, err)
	}
	state, err := FetchState(context.Background(), addr)
	if err != nil || state.PeerID != n.ID().String() || len(state.Nodes) != 1 {
		t.Fatalf("state over the socket: %+v %v", state, err)
	}
	if _, err := FetchLedger(context.Background(), addr, ""); err == nil || !strings.Contains(err.Error(), "no part in a ledger") {
		t.Fatalf("ledger over the socket: %v", err)
	}
}
