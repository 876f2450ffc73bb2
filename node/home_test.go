package node

import (
	"bytes"
	"errors"
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
