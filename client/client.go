// Package client is the Go library that asks the neuro network for text.
// A Client joins the network as a light DHT client (it stores no records
// and serves nothing), finds the gating nodes of a model through their
// provider records, and streams a generation from one of them over the
// /neuro/infer/1.0.0 protocol, moving to another gating node if the first
// fails before it has produced a token.
//
//	c, err := client.New(ctx, client.WithBootstrap("/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW…"))
//	…
//	s, err := c.Generate(ctx, client.Request{Model: model, Prompt: "Once upon a time", MaxTokens: 64})
//	for {
//		tok, err := s.Next()
//		if err == io.EOF {
//			break
//		}
//		…
//		fmt.Print(tok.Text)
//	}
//
// With WithWallet, every request is paid from the wallet's ledger account
// (Quote says what one would cost first).
//
// The package is pure Go: it does not link the model engine.
package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/x/rate"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/neuro-p2p/neuro/neuropb"
)

// Option configures a Client.
type Option func(*options) error

type options struct {
	bootstrap []peer.AddrInfo
	gating    []peer.AddrInfo
	key       crypto.PrivKey
	wallet    crypto.PrivKey
	log       *slog.Logger
	timeout   time.Duration
	transport any
}

// WithTransport makes the client dial through this libp2p transport (a
// constructor for libp2p.Transport) instead of TCP, QUIC and the others:
// a simulation's in-process network (package testnet/simnet).
func WithTransport(constructor any) Option {
	return func(o *options) error {
		if constructor == nil {
			return errors.New("nil transport")
		}
		o.transport = constructor
		return nil
	}
}

// WithBootstrap sets the bootstrap peers: multiaddrs that end in
// /p2p/<peer ID>.
func WithBootstrap(addrs ...string) Option {
	return func(o *options) error {
		infos, err := parseAddrs(addrs)
		if err != nil {
			return fmt.Errorf("bootstrap: %w", err)
		}
		o.bootstrap = append(o.bootstrap, infos...)
		return nil
	}
}

// WithGatingNodes names gating nodes to use before any the DHT finds
// (multiaddrs that end in /p2p/<peer ID>). With no bootstrap peers, only
// these are used.
func WithGatingNodes(addrs ...string) Option {
	return func(o *options) error {
		infos, err := parseAddrs(addrs)
		if err != nil {
			return fmt.Errorf("gating node: %w", err)
		}
		o.gating = append(o.gating, infos...)
		return nil
	}
}

// WithIdentity sets the client's key (default: a new Ed25519 key).
func WithIdentity(k crypto.PrivKey) Option {
	return func(o *options) error {
		if k == nil {
			return errors.New("nil identity key")
		}
		o.key = k
		return nil
	}
}

// WithWallet pays for every request from the ledger account of k (a
// wallet's key, 'neurod wallet new'): before each request the client asks
// the gating node for a quote, signs an escrow for the request's most
// from the account, and sends it along; the gating node submits it,
// settles the experts' work from it and returns the rest at once. The
// wallet's key is also the client's identity, which is how the gating
// node knows the escrow is the requester's own. Each escrow takes the
// account's next nonce: run one paid request at a time per wallet.
func WithWallet(k crypto.PrivKey) Option {
	return func(o *options) error {
		if k == nil {
			return errors.New("nil wallet key")
		}
		o.wallet, o.key = k, k
		return nil
	}
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(o *options) error {
		if l == nil {
			return errors.New("nil logger")
		}
		o.log = l
		return nil
	}
}

// WithConnectTimeout bounds connecting to one peer (default 10 s).
func WithConnectTimeout(d time.Duration) Option {
	return func(o *options) error {
		if d <= 0 {
			return fmt.Errorf("connect timeout %v: must be positive", d)
		}
		o.timeout = d
		return nil
	}
}

func parseAddrs(addrs []string) ([]peer.AddrInfo, error) {
	var out []peer.AddrInfo
	for _, s := range addrs {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			return nil, fmt.Errorf("%q: %w", s, err)
		}
		ai, err := peer.AddrInfoFromP2pAddr(a)
		if err != nil {
			return nil, fmt.Errorf("%q: %w (the address must end in /p2p/<peer ID>)", s, err)
		}
		out = append(out, *ai)
	}
	return out, nil
}

// Client is a connection to the neuro network. It is safe for concurrent
// use.
type Client struct {
	h       host.Host
	dht     *dht.IpfsDHT
	log     *slog.Logger
	gating  []peer.AddrInfo
	timeout time.Duration
	wallet  crypto.PrivKey

	mu    sync.Mutex
	cache map[cid.Cid]cached
}

type cached struct {
	at    time.Time
	infos []peer.AddrInfo
}

// New starts a client: a libp2p host that listens nowhere and a DHT in
// client mode, connected to at least one bootstrap peer (it fails if none
// answers before ctx ends).
func New(ctx context.Context, opts ...Option) (_ *Client, err error) {
	o := options{log: slog.Default(), timeout: 10 * time.Second}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, fmt.Errorf("client option: %w", err)
		}
	}
	if len(o.bootstrap) == 0 && len(o.gating) == 0 {
		return nil, errors.New("client: no bootstrap peers and no gating nodes (use WithBootstrap)")
	}
	lopts := []libp2p.Option{libp2p.NoListenAddrs, libp2p.EnableHolePunching(), libp2p.UserAgent("neuro-client")}
	if o.key != nil {
		lopts = append(lopts, libp2p.Identity(o.key))
	}
	if o.transport != nil {
		// Its connections carry no IP address, and libp2p's limiter of
		// new connections puts all of those in one small bucket.
		rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(rcmgr.DefaultLimits.AutoScale()), rcmgr.WithConnRateLimiters(&rate.Limiter{}))
		if err != nil {
			return nil, fmt.Errorf("client: resource manager: %w", err)
		}
		lopts = append(lopts, libp2p.Transport(o.transport), libp2p.ResourceManager(rm))
	}
	h, err := libp2p.New(lopts...)
	if err != nil {
		return nil, fmt.Errorf("client: libp2p host: %w", err)
	}
	if o.wallet != nil && o.key != o.wallet {
		return nil, errors.New("client: WithWallet and WithIdentity name different keys (the wallet is the identity)")
	}
	c := &Client{h: h, log: o.log.With("component", "client"), gating: o.gating, timeout: o.timeout, wallet: o.wallet,
		cache: map[cid.Cid]cached{}}
	defer func() {
		if err != nil {
			err = errors.Join(err, c.Close())
		}
	}()
	if len(o.bootstrap) == 0 {
		return c, nil
	}
	c.dht, err = dht.New(h, dht.Mode(dht.ModeClient), dht.ProtocolPrefix(neuropb.DHTPrefix),
		dht.BootstrapPeers(o.bootstrap...))
	if err != nil {
		return nil, fmt.Errorf("client: dht: %w", err)
	}
	var errs []error
	connected := 0
	for _, ai := range o.bootstrap {
		cctx, cancel := context.WithTimeout(ctx, c.timeout)
		err := h.Connect(cctx, ai)
		cancel()
		if err != nil {
			errs = append(errs, err)
			continue
		}
		connected++
	}
	if connected == 0 {
		return nil, fmt.Errorf("client: none of %d bootstrap peers reachable: %w", len(o.bootstrap), errors.Join(errs...))
	}
	// The DHT adds a peer to its routing table once identify has told it
	// the peer speaks the DHT protocol.
	for c.dht.RoutingTable().Size() == 0 {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("client: bootstrap peers connected but none is a DHT server: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	return c, nil
}

// Close disconnects from the network.
func (c *Client) Close() error {
	var errs []error
	if c.dht != nil {
		errs = append(errs, c.dht.Close())
	}
	errs = append(errs, c.h.Close())
	return errors.Join(errs...)
}

// ID is the client's peer ID.
func (c *Client) ID() peer.ID { return c.h.ID() }

// GatingNodes lists the gating nodes of a model: those given with
// WithGatingNodes, then those that provide the model's gating key in the
// DHT (looked up at most once a minute), connected ones first.
func (c *Client) GatingNodes(ctx context.Context, model cid.Cid) ([]peer.AddrInfo, error) {
	out := slices.Clone(c.gating)
	if c.dht == nil {
		return out, nil
	}
	c.mu.Lock()
	e, ok := c.cache[model]
	c.mu.Unlock()
	if !ok || time.Since(e.at) > time.Minute || len(e.infos) == 0 {
		fctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		defer cancel()
		e = cached{at: time.Now()}
		for ai := range c.dht.FindProvidersAsync(fctx, neuropb.GatingKey(model), 20) {
			if ai.ID != c.h.ID() {
				e.infos = append(e.infos, ai)
			}
		}
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("find gating nodes of %s: %w", model, err)
		}
		c.mu.Lock()
		c.cache[model] = e
		c.mu.Unlock()
	}
	found := slices.Clone(e.infos)
	rand.Shuffle(len(found), func(i, j int) { found[i], found[j] = found[j], found[i] })
	slices.SortStableFunc(found, func(a, b peer.AddrInfo) int {
		ca := c.h.Network().Connectedness(a.ID) == network.Connected
		cb := c.h.Network().Connectedness(b.ID) == network.Connected
		switch {
		case ca && !cb:
			return -1
		case cb && !ca:
			return 1
		}
		return 0
	})
	for _, ai := range found {
		if !slices.ContainsFunc(out, func(x peer.AddrInfo) bool { return x.ID == ai.ID }) {
			out = append(out, ai)
		}
	}
	return out, nil
}

// forget drops a model's cached gating nodes, after they all failed.
func (c *Client) forget(model cid.Cid) {
	c.mu.Lock()
	delete(c.cache, model)
	c.mu.Unlock()
}
