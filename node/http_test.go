package node

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/multiformats/go-multihash"

	"github.com/neuro-p2p/neuro/billing"
	"github.com/neuro-p2p/neuro/moe/moetest"
)

func gatingConfig(t *testing.T) (Config, string) {
	t.Helper()
	home := t.TempDir()
	if _, err := Init(home, false); err != nil {
		t.Fatal(err)
	}
	mh, _ := multihash.Sum([]byte("a model no peer has"), multihash.SHA2_256, -1)
	cfg := DefaultConfig()
	cfg.P2P.Listen = []string{"/ip4/127.0.0.1/tcp/0"}
	cfg.P2P.NAT.PortMap, cfg.P2P.NAT.AutoNAT, cfg.P2P.NAT.RelayService = false, false, "off"
	cfg.API.Listen = ""
	cfg.Expert.Model = cid.NewCidV1(cid.Raw, mh).String()
	cfg.Gating.Enabled = true
	return cfg, home
}

// selfSigned writes a certificate for 127.0.0.1 and its key.
func selfSigned(t *testing.T) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "neuro test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	_ = os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	_ = os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	c, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(c)
	return certFile, keyFile, pool
}

// A gating node refuses to put its API, unauthenticated, on an address
// that is not loopback, unless told to or once it has keys; and it serves
// HTTPS from the operator's certificate.
func TestHTTPListenerExposureAndTLS(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	cfg, home := gatingConfig(t)
	cfg.HTTP.Listen = "0.0.0.0:0"
	_, err := New(cfg, WithHome(home), WithLogger(log), WithCompute(moetest.Backend{}))
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Key != "http.listen" || !strings.Contains(err.Error(), "no API keys") {
		t.Fatalf("an open API on every interface: %v", err)
	}
	cfg.HTTP.AllowUnauthenticated = true
	n, err := New(cfg, WithHome(home), WithLogger(log), WithCompute(moetest.Backend{}))
	if err != nil {
		t.Fatalf("with http.allow_unauthenticated: %v", err)
	}
	n.Close()
	// Once the node has a key, it may listen anywhere.
	cfg.HTTP.AllowUnauthenticated = false
	key, _ := LoadIdentity(home)
	self, _ := peer.IDFromPrivateKey(key)
	store, err := billing.Open(filepath.Join(home, APIKeysFile), self)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := store.Create(self, 1, 0); err != nil {
		t.Fatal(err)
	}
	certFile, keyFile, pool := selfSigned(t)
	cfg.HTTP.Listen, cfg.HTTP.TLSCert, cfg.HTTP.TLSKey = "127.0.0.1:0", certFile, ""
	if err := cfg.Validate(); err == nil {
		t.Fatal("a certificate without its key was accepted")
	}
	cfg.HTTP.TLSKey = keyFile
	n, err = New(cfg, WithHome(home), WithLogger(log), WithCompute(moetest.Backend{}))
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if err := n.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}, Timeout: 10 * time.Second}
	resp, err := c.Get("https://" + n.HTTPAddr() + StatePath)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("state over HTTPS: %d", resp.StatusCode)
	}
	resp, err = c.Post("https://"+n.HTTPAddr()+"/v1/completions", "application/json", strings.NewReader(`{}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 {
		t.Fatalf("a completion without a key on a node with keys: %d", resp.StatusCode)
	}
	cfg.HTTP.TLSKey = certFile // not a key
	other := t.TempDir()
	if _, err := Init(other, false); err != nil {
		t.Fatal(err)
	}
	cfg.HTTP.AllowUnauthenticated = true
	if _, err := New(cfg, WithHome(other), WithLogger(log), WithCompute(moetest.Backend{})); !errors.As(err, &fe) || fe.Key != "http.tls_cert" {
		t.Fatalf("a broken certificate pair: %v", err)
	}
}
