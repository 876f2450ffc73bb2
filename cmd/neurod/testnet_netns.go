package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/neuro-p2p/neuro/internal/progress"
	"github.com/neuro-p2p/neuro/node"
	"github.com/neuro-p2p/neuro/testnet"
	"github.com/neuro-p2p/neuro/testnet/netns"
)

// netnsArgs are the flags of `neurod testnet --netns`.
type netnsArgs struct {
	homes   int
	publics int
	nats    []netns.NAT
	links   []netns.Link // nil: plain lines
	// spread places each expert on one expert home only, round robin, so
	// that a token's experts in a layer are often on different nodes.
	spread bool
}

// parseLinks reads --rtt (one for every home, or one per home), --jitter,
// --loss and --bandwidth into one link per home, or nil when none is set.
func parseLinks(rtt, jitter, loss, bandwidth string, homes int) ([]netns.Link, error) {
	if rtt == "" && jitter == "" && loss == "" && bandwidth == "" {
		return nil, nil
	}
	var l netns.Link
	var err error
	rtts := []time.Duration{0}
	if rtt != "" {
		parts := strings.Split(rtt, ",")
		if len(parts) != 1 && len(parts) != homes {
			return nil, fmt.Errorf("flag --rtt %q: %d values for %d homes: give one for all or one per home", rtt, len(parts), homes)
		}
		rtts = rtts[:0]
		for _, p := range parts {
			d, err := time.ParseDuration(strings.TrimSpace(p))
			if err != nil || d < 0 {
				return nil, fmt.Errorf("flag --rtt %q: want durations such as 50ms, or 20ms,50ms,... one per home", rtt)
			}
			rtts = append(rtts, d)
		}
	}
	if jitter != "" {
		if l.Jitter, err = time.ParseDuration(jitter); err != nil || l.Jitter < 0 {
			return nil, fmt.Errorf("flag --jitter %q: want a duration such as 2ms", jitter)
		}
	}
	if loss != "" {
		v, pct := strings.CutSuffix(strings.TrimSpace(loss), "%")
		if l.Loss, err = strconv.ParseFloat(v, 64); err != nil {
			return nil, fmt.Errorf("flag --loss %q: want a share such as 1%% or 0.01", loss)
		}
		if pct {
			l.Loss /= 100
		}
	}
	if bandwidth != "" {
		if l.Bandwidth, err = netns.ParseBandwidth(bandwidth); err != nil {
			return nil, fmt.Errorf("flag --bandwidth: %w", err)
		}
	}
	out := make([]netns.Link, homes)
	for i := range out {
		out[i] = l
		out[i].RTT = rtts[min(i, len(rtts)-1)]
		if err := out[i].Validate(); err != nil {
			return nil, fmt.Errorf("flags --rtt, --jitter, --loss, --bandwidth (home %d): %w", i, err)
		}
	}
	return out, nil
}

// spreadExperts is the --experts list of expert home j of n under
// --spread: every layer's experts e with e mod n = j.
func spreadExperts(layers, experts, j, n int) string {
	var parts []string
	for l := range layers {
		for e := j; e < experts; e += n {
			parts = append(parts, fmt.Sprintf("%d:%d", l, e))
		}
	}
	return strings.Join(parts, ",")
}

// testnetLink is the report's view of the homes' lines: what was asked,
// and what a ping measured before the nodes started.
type testnetLink struct {
	// RTTMs is the round trip asked between the first two homes; with one
	// --rtt per home, HomeRTTMs are those (two homes are the mean of
	// theirs apart).
	RTTMs        float64   `json:"rtt_ms"`
	HomeRTTMs    []float64 `json:"home_rtt_ms"`
	JitterMs     float64   `json:"jitter_ms"`
	Loss         float64   `json:"loss"`
	BandwidthBps int64     `json:"bandwidth_bps"`
	// ToPublicMs is each home's median ping to the bootstrap node: half
	// its RTT, since only a home's own line delays its packets.
	ToPublicMs []float64 `json:"to_public_ms"`
	// MeasuredRTTMs is the round trip between the first two homes, the
	// sum of their pings to the public segment, and RTTError how far it is
	// from what was asked (a share; within ±0.10 is the goal).
	MeasuredRTTMs float64 `json:"measured_rtt_ms"`
	RTTError      float64 `json:"rtt_error"`
	// Lines counts the packets each home's line carried and dropped.
	Lines []netns.LineStats `json:"lines,omitempty"`
}

// measureLink pings the bootstrap node from every home.
func measureLink(ctx context.Context, topo *netns.Net) (*testnetLink, error) {
	l := topo.Links[0]
	rep := &testnetLink{RTTMs: ms(topo.Links[0].RTT+topo.Links[1].RTT) / 2, JitterMs: ms(l.Jitter), Loss: l.Loss, BandwidthBps: l.Bandwidth}
	for i, h := range topo.Homes {
		rep.HomeRTTMs = append(rep.HomeRTTMs, ms(topo.Links[i].RTT))
		rtts, err := h.Ping(ctx, topo.Publics[0].IP, 20, 10*time.Millisecond, topo.Links[i].RTT+time.Second)
		if err != nil {
			return nil, err
		}
		rep.ToPublicMs = append(rep.ToPublicMs, ms(rtts[len(rtts)/2]))
	}
	rep.MeasuredRTTMs = rep.ToPublicMs[0] + rep.ToPublicMs[1]
	if rep.RTTMs > 0 {
		rep.RTTError = rep.MeasuredRTTMs/rep.RTTMs - 1
	}
	return rep, nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// testnetConn is how two nodes that exchanged expert traffic talk.
type testnetConn struct {
	A         string `json:"a"`
	B         string `json:"b"`
	Direct    bool   `json:"direct"`
	ViaRelay  bool   `json:"via_relay"`
	Transport string `json:"transport"`
	Calls     int64  `json:"calls"`
	// NATs are A's and B's NAT kinds ("" for a public node).
	NATs [2]string `json:"nats"`
	// RTTMs is the round trip the lines put between A and B (--rtt).
	RTTMs float64 `json:"rtt_ms,omitempty"`
}

// testnetTopology describes the emulated internet.
type testnetTopology struct {
	Publics []testnetPlace `json:"publics"`
	Homes   []testnetPlace `json:"homes"`
}

type testnetPlace struct {
	Node      int    `json:"node"`
	Namespace string `json:"namespace"`
	IP        string `json:"ip"`
	// PublicIP and NAT: a home's router's address and NAT kind.
	PublicIP string `json:"public_ip,omitempty"`
	NAT      string `json:"nat,omitempty"`
}

// parseNATs expands --nat: one kind for every home, or one per home.
func parseNATs(s string, homes int) ([]netns.NAT, error) {
	parts := strings.Split(s, ",")
	if len(parts) != 1 && len(parts) != homes {
		return nil, fmt.Errorf("%d kinds for %d homes: give one kind for all or one per home", len(parts), homes)
	}
	out := make([]netns.NAT, homes)
	for i := range out {
		k, err := netns.ParseNAT(strings.TrimSpace(parts[min(i, len(parts)-1)]))
		if err != nil {
			return nil, err
		}
		out[i] = k
	}
	return out, nil
}

// netnsPrefix names this process's namespaces; stale ones are those of
// testnets whose process is gone.
const netnsPrefix = "ntn"

var stalePrefix = regexp.MustCompile(`^` + netnsPrefix + `(\d+)-`)

// cleanupStale removes the namespaces of netns testnets that crashed.
func cleanupStale(ctx context.Context, log *slog.Logger) {
	out, err := exec.CommandContext(ctx, "ip", "netns", "list").Output()
	if err != nil {
		return
	}
	done := map[string]bool{}
	for _, line := range strings.Split(string(out), "\n") {
		m := stalePrefix.FindStringSubmatch(strings.TrimSpace(line))
		if m == nil || done[m[1]] {
			continue
		}
		done[m[1]] = true
		pid, _ := strconv.Atoi(m[1])
		if pid > 0 && syscall.Kill(pid, 0) == nil {
			continue // a live testnet's
		}
		log.Info("removing the namespaces of a testnet that did not clean up", "pid", pid)
		if err := netns.Cleanup(ctx, netnsPrefix+m[1]); err != nil {
			log.Warn("cleanup", "err", err)
		}
	}
}

// runNetnsTestnet is `neurod testnet --netns`: public nodes on an emulated
// internet, and homes behind NAT routers, each node a process in its own
// network namespace. Node 0 is the bootstrap node, relay and validator;
// the other public nodes are DHT servers (AutoNAT needs a few peers to
// tell a home it is private, and libp2p trusts an observed address that
// four peers saw); the first home is the gating node and the other homes
// are expert nodes, so expert traffic crosses two NATs.
func runNetnsTestnet(ctx context.Context, stdout, stderr io.Writer, a testnetArgs, na netnsArgs, log *slog.Logger) (err error) {
	bin, err := os.Executable()
	if err != nil {
		return fmt.Errorf("testnet: find neurod binary: %w", err)
	}
	rep := testnetReport{Nodes: []testnetNode{}, Tokens: []int32{}, PerTokenMs: []float64{}}
	fail := func(err error) error {
		rep.Error = err.Error()
		if a.json {
			writeJSON(stdout, rep)
		}
		return &exitError{code: 1, err: err}
	}
	if err := netns.Available(); err != nil {
		return fail(fmt.Errorf("--netns: %w", err))
	}
	dir := a.dir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "neuro-testnet-"); err != nil {
			return fail(err)
		}
		defer os.RemoveAll(dir)
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return fail(fmt.Errorf("flag --dir %s: %w", dir, err))
	}
	rep.Dir = dir
	cleanupStale(ctx, log)
	topo, err := netns.Create(ctx, netns.Topology{Prefix: fmt.Sprintf("%s%d", netnsPrefix, os.Getpid()), Publics: na.publics, Homes: na.nats, Links: na.links})
	if err != nil {
		return fail(err)
	}
	defer func() {
		if cerr := topo.Close(); cerr != nil {
			log.Warn("remove the namespaces", "err", cerr)
		}
	}()
	if na.links != nil {
		if rep.Link, err = measureLink(ctx, topo); err != nil {
			return fail(fmt.Errorf("measure the homes' lines: %w", err))
		}
		lr := rep.Link
		log.Info("homes' lines measured", "rtt_asked_ms", lr.RTTMs, "rtt_measured_ms", lr.MeasuredRTTMs, "to_public_ms", lr.ToPublicMs)
		if lr.RTTMs > 0 && math.Abs(lr.RTTError) > 0.10 {
			log.Warn("the emulated RTT is more than 10% off what was asked (a busy machine?)", "asked_ms", lr.RTTMs, "measured_ms", lr.MeasuredRTTMs)
		}
	}
	mf, err := prepareModel(dir, a.model, log)
	if err != nil {
		return fail(err)
	}
	rep.Model, rep.ModelFile = mf.cid.String(), mf.path
	layers, experts := int(mf.manifest.GetParams().GetLayers()), int(mf.manifest.GetParams().GetExperts())

	P, H := na.publics, na.homes
	if na.spread && H-1 > experts {
		return fail(fmt.Errorf("flag --spread: %d expert homes for %d experts a layer would leave a home with none", H-1, experts))
	}
	gating := P // the first home
	nsOf := func(i int) string {
		if i < P {
			return topo.Publics[i].NS
		}
		return topo.Homes[i-P].NS
	}
	natOf := func(i int) string {
		if i < P {
			return ""
		}
		return string(topo.Homes[i-P].NAT)
	}
	topoRep := &testnetTopology{}
	for i, h := range topo.Publics {
		topoRep.Publics = append(topoRep.Publics, testnetPlace{Node: i, Namespace: h.NS, IP: h.IP.String()})
	}
	for i, h := range topo.Homes {
		topoRep.Homes = append(topoRep.Homes, testnetPlace{Node: P + i, Namespace: h.NS, IP: h.IP.String(),
			PublicIP: h.Router.IP.String(), NAT: string(h.NAT)})
	}
	rep.Topology = topoRep

	genesisPath := filepath.Join(dir, "genesis.json")
	threads := max(1, runtime.NumCPU()/(H+1))
	log.Info("starting netns testnet", "publics", P, "homes", H, "nat", na.nats, "model", mf.cid, "dir", dir)
	show := progress.New(stderr)
	up := show.Bar(int64(P+H), "nodes up", false)
	nw, err := testnet.Launch(ctx, testnet.LaunchOptions{Nodes: P + H, Dir: dir, Binary: bin, Timeout: a.timeout, Log: log,
		Up:   func(n int) { _ = up.Set(n) },
		Wrap: func(i int) []string { return []string{"ip", "netns", "exec", nsOf(i)} },
		BootAddrs: func(addrs []string) []string {
			var out []string
			for _, ad := range addrs {
				if strings.HasPrefix(ad, "/ip4/"+topo.Publics[0].IP.String()+"/") {
					out = append(out, ad)
				}
			}
			return out
		},
		Config: func(i int, c *node.Config) {
			c.P2P.Listen = []string{"/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"}
			c.P2P.NAT.AutoNAT, c.P2P.NAT.HolePunching, c.P2P.NAT.RelayClient, c.P2P.NAT.PortMap = true, true, true, false
			c.API.Listen = "unix:" + filepath.Join(testnet.Home(dir, i), "api.sock")
			c.Expert.Threads = threads
			c.Gating.Threads = max(1, runtime.NumCPU()/2)
			c.Ledger.Genesis = genesisPath
			c.Ledger.Listen = "tcp://" + topo.Publics[0].IP.String() + ":26656"
			c.Ledger.BlockInterval = node.Duration(200 * time.Millisecond)
			switch {
			case i == 0: // bootstrap (its relay is on: prepareHome)
			case i < P:
				c.P2P.DHT.Mode = "server"
				c.P2P.NAT.RelayService = "off"
			default:
				c.P2P.DHT.Mode = "auto"
				c.P2P.NAT.RelayService = "off"
			}
		},
		Args: func(i int) []string {
			switch {
			case i == gating:
				return []string{"--gating", "--model", mf.cid.String(), "--experts", "none"}
			case i > gating && na.spread:
				return []string{"--model", mf.cid.String(), "--experts", spreadExperts(layers, experts, i-gating-1, H-1)}
			case i > gating:
				return []string{"--model", mf.cid.String()}
			}
			return nil
		},
		BeforeStart: seedTestnet(genesisPath, mf, 1),
	})
	_ = up.Finish()
	if err != nil {
		return fail(err)
	}
	defer func() { rep.Stopped = stopNetwork(nw, log) }()
	fill := func() { rep.Nodes = reportNodes(nw) }
	failNet := func(err error) error {
		fill()
		for _, p := range nw.Processes() {
			fmt.Fprint(stderr, p.LogTail(10))
		}
		return fail(err)
	}

	// Healthy here: every node hears every other's heartbeats, and every
	// home holds a relay reservation (its AutoNAT found it private).
	start := time.Now()
	hctx, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	if err := waitUntil(hctx, func() error {
		if err := nw.Refresh(hctx); err != nil {
			return err
		}
		sts := nw.Statuses()
		for i, st := range sts {
			if len(st.Heard) < len(sts)-1 {
				return fmt.Errorf("node %d hears %d of %d peers", i, len(st.Heard), len(sts)-1)
			}
			if i >= P && !slices.ContainsFunc(st.Addrs, func(ad string) bool { return strings.Contains(ad, "/p2p-circuit") }) {
				return fmt.Errorf("home node %d has no relay reservation yet", i)
			}
		}
		return nil
	}); err != nil {
		if ctx.Err() != nil {
			return failNet(fmt.Errorf("testnet: interrupted while the network came up: %w", ctx.Err()))
		}
		return failNet(fmt.Errorf("testnet unhealthy: %w", err))
	}
	rep.Healthy, rep.TookMs = true, (nw.Took + time.Since(start)).Milliseconds()
	log.Info("network healthy: homes behind NAT hold relay reservations", "took", time.Since(start).Round(time.Millisecond))
	readyStart := time.Now()
	minProviders := min(2, H-1)
	if na.spread {
		minProviders = 1
	}
	if err := waitServing(ctx, nw, a.timeout, layers, experts, minProviders, nil, show, gating); err != nil {
		return failNet(err)
	}
	// The gating node opens sessions to its experts ahead of a prompt
	// (warm); give hole punching between cone NATs, with its retries, time
	// to finish before asking, so that the prompt measures the network as
	// it settles. A pair that stays relayed is reported as such.
	pctx, pcancel := context.WithTimeout(ctx, 45*time.Second)
	perr := waitUntil(pctx, func() error {
		if err := nw.Refresh(pctx); err != nil {
			return err
		}
		sts := nw.Statuses()
		g := sts[gating].Gating
		if g == nil {
			return errors.New("gating node: no status")
		}
		links := map[string]node.ExpertLink{}
		for _, l := range g.Links {
			links[l.PeerID] = l
		}
		for i := gating + 1; i < len(sts); i++ {
			l, ok := links[sts[i].PeerID]
			if !ok {
				return fmt.Errorf("no session to expert node %d yet", i)
			}
			if natOf(gating) == string(netns.Cone) && natOf(i) == string(netns.Cone) && !l.Direct {
				return fmt.Errorf("expert node %d still reached through the relay", i)
			}
		}
		return nil
	})
	pcancel()
	if perr != nil {
		log.Warn("links not settled", "err", perr)
	}
	rep.ReadyMs = time.Since(readyStart).Milliseconds()
	fill()

	// The prompt, asked from the gating node's home by `neurod generate
	// --network` (this process cannot reach into the sealed topology).
	boot := nw.Processes()[0].Status
	bootAddr := fmt.Sprintf("/ip4/%s/tcp/4001/p2p/%s", topo.Publics[0].IP, boot.PeerID)
	gctx, gcancel := context.WithTimeout(ctx, a.timeout)
	defer gcancel()
	cmd := exec.CommandContext(gctx, "ip", "netns", "exec", nsOf(gating), bin, "generate", "--network", "--bootstrap", bootAddr,
		"--model", mf.cid.String(), "--prompt", a.prompt, "--max-tokens", strconv.Itoa(a.maxTokens), "--json")
	var gerr strings.Builder
	cmd.Stderr = &gerr
	out, err := cmd.Output()
	if err != nil {
		return failNet(fmt.Errorf("generate from the gating node's home: %w: %s", err, strings.TrimSpace(gerr.String())))
	}
	var gen generateOutput
	if err := json.Unmarshal(out, &gen); err != nil {
		return failNet(fmt.Errorf("generate: %w", err))
	}
	rep.Tokens, rep.Text, rep.PerTokenMs, rep.PromptTokens = gen.Tokens, gen.Text, gen.PerTokenMs, gen.PromptTokens
	rep.TokensPerSecond, rep.FinishReason, rep.Requests = gen.TokensPerSecond, gen.FinishReason, 1
	rep.Stats = gen.Stats

	// How the gating node reached each expert node it called.
	if err := nw.Refresh(ctx); err != nil {
		return failNet(err)
	}
	fill()
	idx := map[string]int{}
	for i, st := range nw.Statuses() {
		idx[st.PeerID] = i
	}
	gst := nw.Statuses()[gating]
	if gst.Gating != nil {
		for _, l := range gst.Gating.Links {
			c := testnetConn{A: gst.PeerID, B: l.PeerID, Direct: l.Direct, ViaRelay: l.ViaRelay,
				Transport: l.Transport, Calls: l.Calls, NATs: [2]string{natOf(gating), natOf(idx[l.PeerID])}}
			if j := idx[l.PeerID] - P; na.links != nil && j >= 0 {
				c.RTTMs = ms(na.links[gating-P].RTT+na.links[j].RTT) / 2
			}
			rep.Connections = append(rep.Connections, c)
		}
	}
	if rep.Link != nil {
		rep.Link.Lines = topo.LineStats()
	}
	if a.json {
		writeJSON(stdout, rep)
	} else {
		printNodes(stdout, rep)
		fmt.Fprintf(stdout, "\n%s\n", rep.Text)
		for _, c := range rep.Connections {
			how := "direct (hole punched)"
			if c.ViaRelay {
				how = "through the relay"
			}
			fmt.Fprintf(stdout, "gating (%s NAT) -> %s (%s NAT): %s over %s, %d calls\n", c.NATs[0], c.B, c.NATs[1], how, c.Transport, c.Calls)
		}
	}
	if a.check {
		if len(rep.Tokens) == 0 {
			return &exitError{code: 1, err: errors.New("no tokens")}
		}
		return nil
	}
	fmt.Fprintf(stderr, "\ntestnet is up; press Ctrl-C to stop it (the namespaces go with it). Ask it yourself:\n")
	fmt.Fprintf(stderr, "  ip netns exec %s %s generate --network --bootstrap %s --model %s --prompt 'Hello'\n", nsOf(gating), bin, bootAddr, mf.cid)
	<-ctx.Done()
	return nil
}

// waitUntil polls check every 200 ms until it passes or ctx ends.
func waitUntil(ctx context.Context, check func() error) error {
	for {
		err := check()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(200 * time.Millisecond):
		}
	}
}
