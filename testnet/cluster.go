// Package testnet runs neuro networks on one machine and owns the testnet
// that `neurod testnet` and `neurod bench` drive:
//
//   - Scenario is one run in explicit stages (prepare the model → set up
//     the topology → launch → wait healthy → wait serving → open an escrow
//     → ask → settle → report → stop), with one exported Report used by the
//     CLI, the bench and the tests.
//   - Topology is where the nodes run, with two implementations: Loopback
//     (processes on 127.0.0.1) and Netns (an emulated internet of network
//     namespaces, package netns), as CometBFT's e2e infra providers serve
//     docker and digitalocean.
//   - Bench runs the same model on one machine, split, on the loopback
//     testnet and over emulated latency, in this process.
//   - Launch starts N real neurod processes; Cluster runs N real nodes on
//     loopback inside one process (used by tests across packages).
//
// The package is pure Go: it never links llama.cpp (Bench is given the
// on-machine runs by the binary).
package testnet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"

	"github.com/neuro-p2p/neuro/node"
)

// LoopbackConfig is the node config a local testnet uses: TCP and QUIC on
// 127.0.0.1 with OS-chosen ports, DHT server mode (AutoNAT would never find
// a loopback node public), no port mapping or relay service, and a fast
// heartbeat so that the network is seen to be up within seconds.
func LoopbackConfig() node.Config {
	cfg := node.DefaultConfig()
	cfg.P2P.Listen = []string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"}
	cfg.P2P.DHT.Mode = "server"
	cfg.P2P.NAT.PortMap = false
	cfg.P2P.NAT.AutoNAT = false
	cfg.P2P.NAT.RelayService = "off"
	cfg.P2P.BootstrapTimeout = node.Duration(20 * time.Second)
	cfg.Gossip.HeartbeatInterval = node.Duration(time.Second)
	cfg.Gossip.HeartbeatRate = 0 // a few nodes: every second, always
	cfg.Gossip.PeerExpiry = node.Duration(10 * time.Second)
	// A testnet runs unpaid requests too (the dashboard's, the bench's, a
	// user's curl) besides its paid prompt and API keys.
	cfg.Gating.RequirePayment = false
	cfg.Expert.RequireEscrow = false
	// A testnet's nodes share this machine's cores: a compute thread
	// spinning in one takes a core from the node it waits for.
	cfg.Home.ComputePoll = 0
	return cfg
}

// Cluster is N nodes in this process, all on loopback. Node 0 is the
// bootstrap node; the others know only its address.
type Cluster struct {
	nodes []*node.Node
}

// ClusterOptions configures NewCluster.
type ClusterOptions struct {
	// Config is each node's config (default LoopbackConfig()); bootstrap
	// addresses are filled in.
	Config *node.Config
	Log    *slog.Logger
}

// NewCluster starts n nodes. ctx bounds the start.
func NewCluster(ctx context.Context, n int, o ClusterOptions) (_ *Cluster, err error) {
	if n < 1 {
		return nil, fmt.Errorf("cluster of %d nodes: need at least 1", n)
	}
	cfg := LoopbackConfig()
	if o.Config != nil {
		cfg = *o.Config
	}
	log := o.Log
	if log == nil {
		log = slog.Default()
	}
	c := &Cluster{}
	defer func() {
		if err != nil {
			err = errors.Join(err, c.Close())
		}
	}()
	start := func(cfg node.Config, i int) (*node.Node, error) {
		key, _, err := crypto.GenerateEd25519Key(nil)
		if err != nil {
			return nil, err
		}
		nd, err := node.New(cfg, node.WithIdentity(key), node.WithLogger(log.With("node", i)))
		if err != nil {
			return nil, fmt.Errorf("node %d: %w", i, err)
		}
		c.nodes = append(c.nodes, nd)
		if err := nd.Start(ctx); err != nil {
			return nil, fmt.Errorf("node %d: %w", i, err)
		}
		return nd, nil
	}
	boot := cfg
	boot.P2P.Roles = append([]string{"bootstrap"}, cfg.P2P.Roles...)
	boot.P2P.Bootstrap = nil
	first, err := start(boot, 0)
	if err != nil {
		return nil, err
	}
	cfg.P2P.Bootstrap = dialAddrs(first)
	for i := 1; i < n; i++ {
		if _, err := start(cfg, i); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// dialAddrs are n's addresses with its peer ID, as bootstrap addresses
// and client.WithGatingNodes take them.
func dialAddrs(n *node.Node) []string {
	var out []string
	for _, a := range n.P2P().Addrs() {
		out = append(out, a.String()+"/p2p/"+n.ID().String())
	}
	return out
}

// Nodes returns the nodes, bootstrap first.
func (c *Cluster) Nodes() []*node.Node { return c.nodes }

// Statuses returns every node's status.
func (c *Cluster) Statuses() []node.Status {
	out := make([]node.Status, len(c.nodes))
	for i, n := range c.nodes {
		out[i] = n.Status()
	}
	return out
}

// WaitHealthy polls Health until it passes or ctx ends.
func (c *Cluster) WaitHealthy(ctx context.Context) error {
	return waitFor(ctx, 100*time.Millisecond, func() error { return Health(c.Statuses()) })
}

// Close stops every node.
func (c *Cluster) Close() error {
	errs := make([]error, 0, len(c.nodes))
	for _, n := range c.nodes {
		errs = append(errs, n.Close())
	}
	return errors.Join(errs...)
}

// waitFor calls check every interval until it returns nil or ctx ends; then
// it returns ctx's error joined with check's last error. A backoffStop from
// check ends the wait at once.
func waitFor(ctx context.Context, interval time.Duration, check func() error) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		err := check()
		if err == nil {
			return nil
		}
		var stop backoffStop
		if errors.As(err, &stop) {
			return stop.error
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %w", ctx.Err(), err)
		case <-t.C:
		}
	}
}

// healthNag is how often a health wait logs why the network is not
// healthy yet.
const healthNag = 20 * time.Second

// sayingWhy wraps a health check for waitFor: while it keeps failing, log
// says why every healthNag, so that a network slow to become healthy
// explains itself.
func sayingWhy(log *slog.Logger, check func() error) func() error {
	start := time.Now()
	said := start
	return func() error {
		err := check()
		if err != nil && time.Since(said) >= healthNag {
			said = time.Now()
			log.Info("network not healthy yet", "waited", time.Since(start).Round(time.Second), "why", err)
		}
		return err
	}
}
