package node

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
)

// WalletFile is a wallet's key in a home, unless --wallet names another
// file. A wallet is a ledger account held by a person who queries: an
// Ed25519 key kept like a node's identity (mode 0600).
const WalletFile = "wallet.key"

// LoadKey reads an Ed25519 private key file (a wallet's, or a node's
// identity).
func LoadKey(path string) (crypto.PrivKey, error) {
	raw, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("key %s: %w", path, err)
	}
	if err != nil {
		return nil, fmt.Errorf("key %s: %w", path, err)
	}
	priv, err := crypto.UnmarshalPrivateKey(raw)
	if err != nil {
		return nil, fmt.Errorf("key %s: %w: %v", path, ErrBadKey, err)
	}
	if priv.Type() != crypto.Ed25519 {
		return nil, fmt.Errorf("key %s: %w: key type %s, want Ed25519", path, ErrBadKey, priv.Type())
	}
	return priv, nil
}

// SaveKey writes key to path (mode 0600, in a directory of mode 0700 if
// it makes one). It refuses to replace a file unless force is set, and
// then keeps the old one as path.bak.
func SaveKey(path string, key crypto.PrivKey, force bool) (peer.ID, error) {
	if _, err := os.Stat(path); err == nil {
		if !force {
			return "", fmt.Errorf("%s: %w (use --force; the old file is kept as %s.bak)", path, ErrExists, path)
		}
		if err := os.Rename(path, path+".bak"); err != nil {
			return "", fmt.Errorf("back up %s: %w", path, err)
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", err
	}
	raw, err := crypto.MarshalPrivateKey(key)
	if err != nil {
		return "", fmt.Errorf("encode key: %w", err)
	}
	if err := WriteFileAtomic(path, raw, 0o600); err != nil {
		return "", err
	}
	return peer.IDFromPrivateKey(key)
}
