package node

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/internal/atomicfile"
)

// Files in a node's home directory.
const (
	ConfigFile   = "config.toml"
	IdentityFile = "identity.key"
	// APIFile holds the address of the running node's control API; it exists
	// only while the node runs.
	APIFile  = "api"
	lockFile = "neurod.lock"
)

// HomeEnv names the environment variable that sets the default home.
const HomeEnv = "NEURO_HOME"

// DefaultHome is $NEURO_HOME, or ~/.neuro.
func DefaultHome() (string, error) {
	if h := os.Getenv(HomeEnv); h != "" {
		return h, nil
	}
	dir, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("home directory: %w (set %s or --home)", err, HomeEnv)
	}
	return filepath.Join(dir, ".neuro"), nil
}

// InitResult says what Init wrote.
type InitResult struct {
	PeerID peer.ID
	// Backups lists files --force moved aside rather than overwrote.
	Backups []string
}

// Init creates the home directory with a new Ed25519 identity (mode 0600)
// and the commented default config. If the home already holds an identity
// or a config it refuses unless force is set; with force, the old files are
// renamed to *.bak-<time> rather than overwritten.
func Init(dir string, force bool) (InitResult, error) {
	var res InitResult
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return res, fmt.Errorf("create home %s: %w", dir, err)
	}
	keyPath := filepath.Join(dir, IdentityFile)
	cfgPath := filepath.Join(dir, ConfigFile)
	stamp := time.Now().UTC().Format("20060102T150405Z")
	for _, p := range []string{keyPath, cfgPath} {
		_, err := os.Stat(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return res, fmt.Errorf("init %s: %w", p, err)
		}
		if !force {
			return res, fmt.Errorf("init %s: %w (use --force to replace it; the old file is kept as a backup)", p, ErrExists)
		}
		bak := p + ".bak-" + stamp
		if err := os.Rename(p, bak); err != nil {
			return res, fmt.Errorf("back up %s: %w", p, err)
		}
		res.Backups = append(res.Backups, bak)
	}
	priv, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		return res, fmt.Errorf("generate identity: %w", err)
	}
	raw, err := crypto.MarshalPrivateKey(priv)
	if err != nil {
		return res, fmt.Errorf("encode identity: %w", err)
	}
	if err := WriteFileAtomic(keyPath, raw, 0o600); err != nil {
		return res, err
	}
	if err := WriteFileAtomic(cfgPath, []byte(configTemplate), 0o644); err != nil {
		return res, err
	}
	if res.PeerID, err = peer.IDFromPrivateKey(priv); err != nil {
		return res, fmt.Errorf("peer id: %w", err)
	}
	return res, nil
}

// LoadIdentity reads the node's private key from the home.
func LoadIdentity(dir string) (crypto.PrivKey, error) {
	path := filepath.Join(dir, IdentityFile)
	raw, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("identity %s: %w (run 'neurod init' first)", path, ErrNotInitialized)
	}
	if err != nil {
		return nil, fmt.Errorf("identity %s: %w", path, err)
	}
	priv, err := crypto.UnmarshalPrivateKey(raw)
	if err != nil {
		return nil, fmt.Errorf("identity %s: %w: %v", path, ErrBadKey, err)
	}
	if priv.Type() != crypto.Ed25519 {
		return nil, fmt.Errorf("identity %s: %w: key type %s, want Ed25519", path, ErrBadKey, priv.Type())
	}
	return priv, nil
}

// WriteFileAtomic writes data to path so that a crash leaves either the old
// file or the new one.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	return atomicfile.Write(path, data, perm)
}

// lockHome takes an exclusive lock on the home so that two processes never
// run one identity. The lock dies with the process.
func lockHome(dir string) (release func() error, err error) {
	path := filepath.Join(dir, lockFile)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("home %s: %w", dir, ErrLocked)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return f.Close, nil
}

// ReadAPIAddr returns the control API address of the node running in dir.
func ReadAPIAddr(dir string) (string, error) {
	path := filepath.Join(dir, APIFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("no node is running in %s (no %s file)", dir, APIFile)
	}
	if err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	return strings.TrimSpace(string(b)), nil
}
