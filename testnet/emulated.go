package testnet

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
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

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/node"
	"github.com/neuro-p2p/neuro/testnet/netns"
)

// Netns is the testnet over an emulated internet of network namespaces
// (package netns): Publics public nodes (node 0 the bootstrap node and
// relay), then one home per NATs entry behind its own NAT router; the
// first home runs the gating node, the others expert nodes. Links, if set,
// shape each home's line. It needs root.
type Netns struct {
	Publics int
	NATs    []netns.NAT
	// Links shapes the homes' lines (nil: plain lines).
	Links []netns.Link
	// Spread places each expert on one expert home only, round robin, so
	// that a token's experts in a layer are often on different nodes.
	Spread bool
	// Spans is every expert home's expert.spans, or one per expert home
	// (as Loopback.Spans).
	Spans string
	// SpanExperts is every span home's expert.span_experts (as
	// Loopback.SpanExperts).
	SpanExperts string
	// KillNodes expert homes' nodes are SIGKILLed once the generation
	// holds KillAfter tokens (as Loopback's).
	KillNodes, KillAfter int

	net *netns.Net
}

var _ Topology = (*Netns)(nil)

func (t *Netns) paid() bool { return false }

// netnsPrefix starts the namespaces' names; the testnet's PID follows, so
// that namespaces a dead testnet left behind can be told apart.
const netnsPrefix = "ntn"

var stalePrefix = regexp.MustCompile(`^` + netnsPrefix + `(\d+)-`)

// Gating implements Topology: the first home.
func (t *Netns) Gating() int { return t.Publics }

func (t *Netns) homes() int { return len(t.NATs) }

// Setup implements Topology: the namespaces, and the lines measured.
func (t *Netns) Setup(ctx context.Context, r *Run) error {
	if err := netns.Available(); err != nil {
		return fmt.Errorf("--netns: %w", err)
	}
	t.cleanupStale(ctx, r)
	topo, err := netns.Create(ctx, netns.Topology{Prefix: fmt.Sprintf("%s%d", netnsPrefix, os.Getpid()), Publics: t.Publics,
		Homes: t.NATs, Links: t.Links})
	if err != nil {
		return err
	}
	t.net = topo
	r.onClose(func() error {
		if err := topo.Close(); err != nil {
			return fmt.Errorf("remove the namespaces: %w", err)
		}
		return nil
	})
	if t.Links != nil {
		if r.Report.Link, err = t.measureLink(ctx); err != nil {
			return fmt.Errorf("measure the homes' lines: %w", err)
		}
		lr := r.Report.Link
		r.log.Info("homes' lines measured", "rtt_asked_ms", lr.RTTMs, "rtt_measured_ms", lr.MeasuredRTTMs, "to_public_ms", lr.ToPublicMs)
		if lr.RTTMs > 0 && math.Abs(lr.RTTError) > 0.10 {
			r.log.Warn("the emulated RTT is more than 10% off what was asked (a busy machine?)", "asked_ms", lr.RTTMs, "measured_ms", lr.MeasuredRTTMs)
		}
	}
	rep := &TopologyReport{}
	for i, h := range topo.Publics {
		rep.Publics = append(rep.Publics, Place{Node: i, Namespace: h.NS, IP: h.IP.String()})
	}
	for i, h := range topo.Homes {
		rep.Homes = append(rep.Homes, Place{Node: t.Publics + i, Namespace: h.NS, IP: h.IP.String(),
			PublicIP: h.Router.IP.String(), NAT: string(h.NAT)})
	}
	r.Report.Topology = rep
	return nil
}

// cleanupStale removes the namespaces of testnets whose process is gone.
func (t *Netns) cleanupStale(ctx context.Context, r *Run) {
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
		r.log.Info("removing the namespaces of a testnet that did not clean up", "pid", pid)
		if err := netns.Cleanup(ctx, netnsPrefix+m[1]); err != nil {
			r.log.Warn("cleanup", "err", err)
		}
	}
}

// measureLink pings the bootstrap node from every home.
func (t *Netns) measureLink(ctx context.Context) (*LinkReport, error) {
	topo := t.net
	l := topo.Links[0]
	rep := &LinkReport{RTTMs: ms(topo.Links[0].RTT+topo.Links[1].RTT) / 2, JitterMs: ms(l.Jitter), Loss: l.Loss, BandwidthBps: l.Bandwidth}
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

// ns is node i's namespace, and nat its NAT kind ("" for a public node).
func (t *Netns) ns(i int) string {
	if i < t.Publics {
		return t.net.Publics[i].NS
	}
	return t.net.Homes[i-t.Publics].NS
}

func (t *Netns) nat(i int) string {
	if i < t.Publics {
		return ""
	}
	return string(t.net.Homes[i-t.Publics].NAT)
}

// Launch implements Topology.
func (t *Netns) Launch(r *Run, o *LaunchOptions) error {
	m, topo, P, H := r.Model, t.net, t.Publics, t.homes()
	if t.Spread && H-1 > m.Experts() {
		return fmt.Errorf("flag --spread: %d expert homes for %d experts a layer would leave a home with none", H-1, m.Experts())
	}
	genesis := r.genesisPath()
	threads := max(1, runtime.NumCPU()/(H+1))
	// As on loopback (shareCores): the expert homes' lanes take all the
	// cores while the gating node waits for them.
	lanes := max(1, runtime.NumCPU()/max(1, H-1)/threads)
	r.log.Info("starting netns testnet", "publics", P, "homes", H, "nat", t.NATs, "model", m.CID, "dir", r.Dir)
	o.Nodes = P + H
	o.Wrap = func(i int) []string { return []string{"ip", "netns", "exec", t.ns(i)} }
	o.BootAddrs = func(addrs []string) []string {
		var out []string
		for _, ad := range addrs {
			if strings.HasPrefix(ad, "/ip4/"+topo.Publics[0].IP.String()+"/") {
				out = append(out, ad)
			}
		}
		return out
	}
	o.Config = func(i int, c *node.Config) {
		c.P2P.Listen = []string{"/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"}
		c.P2P.NAT.AutoNAT, c.P2P.NAT.HolePunching, c.P2P.NAT.RelayClient, c.P2P.NAT.PortMap = true, true, true, false
		c.API.Listen = "unix:" + filepath.Join(Home(r.Dir, i), "api.sock")
		c.Expert.Threads, c.Expert.Lanes = threads, lanes
		c.Gating.Threads = max(1, runtime.NumCPU()/2)
		c.Ledger.Genesis = genesis
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
	}
	gating := t.Gating()
	o.Args = func(i int) []string {
		switch {
		case i == gating:
			return []string{"--gating", "--model", m.CID.String(), "--experts", "none"}
		case i > gating && t.Spread:
			return []string{"--model", m.CID.String(), "--experts", SpreadExperts(m.FirstMoELayer(), m.Layers(), m.Experts(), i-gating-1, H-1)}
		case i > gating && t.Spans != "":
			return append([]string{"--model", m.CID.String()}, spanArgs(t.Spans, i-gating-1, t.SpanExperts)...)
		case i > gating:
			return []string{"--model", m.CID.String()}
		}
		return nil
	}
	o.BeforeStart = seedTestnet(genesis, m, 1, t.Gating())
	return nil
}

// SpansWanted says whether the expert homes serve spans.
func (t *Netns) SpansWanted() func(j int) bool {
	if t.Spans == "" {
		return nil
	}
	return func(j int) bool { return spanOf(t.Spans, j) != "" }
}

// SpreadExperts is the --experts list of expert home j of n under
// --spread: every MoE layer's experts e with e mod n = j.
func SpreadExperts(first, layers, experts, j, n int) string {
	var parts []string
	for l := first; l < layers; l++ {
		for e := j; e < experts; e += n {
			parts = append(parts, fmt.Sprintf("%d:%d", l, e))
		}
	}
	return strings.Join(parts, ",")
}

// WaitHealthy implements Topology: every node hears every other, and
// every home holds a relay reservation.
func (t *Netns) WaitHealthy(ctx context.Context, r *Run) error {
	start := time.Now()
	hctx, cancel := context.WithTimeout(ctx, r.S.Timeout)
	defer cancel()
	err := waitFor(hctx, 200*time.Millisecond, sayingWhy(r.log, func() error { return t.health(hctx, r) }))
	if err != nil {
		return err
	}
	r.Report.TookMs = (r.Net.Took + time.Since(start)).Milliseconds()
	r.log.Info("network healthy: homes behind NAT hold relay reservations", "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// health is nil when every node hears every other and every home holds a
// relay reservation.
func (t *Netns) health(ctx context.Context, r *Run) error {
	if err := r.Net.Refresh(ctx); err != nil {
		return err
	}
	sts := r.Net.Statuses()
	for i, st := range sts {
		if len(st.Heard) < len(sts)-1 {
			return fmt.Errorf("node %d hears %d of %d peers", i, len(st.Heard), len(sts)-1)
		}
		if i >= t.Publics && !slices.ContainsFunc(st.Addrs, func(ad string) bool { return strings.Contains(ad, "/p2p-circuit") }) {
			return fmt.Errorf("home node %d has no relay reservation yet", i)
		}
	}
	return nil
}

// Serving implements Topology: two providers per expert (one under
// Spread), fewer when there are fewer expert homes.
func (t *Netns) Serving() (int, map[int]expert.Fault) {
	if t.Spread {
		return 1, nil
	}
	return min(2, t.homes()-1, spanProviders(t.Spans)), nil
}

// Settle implements Topology: it waits (at most 45 s, then only warns)
// until the gating node has a session to every expert node, direct where
// both are behind cone NATs (hole punched).
func (t *Netns) Settle(ctx context.Context, r *Run) error {
	gating := t.Gating()
	pctx, cancel := context.WithTimeout(ctx, 45*time.Second)
	defer cancel()
	err := waitFor(pctx, 200*time.Millisecond, func() error {
		if err := r.Net.Refresh(pctx); err != nil {
			return err
		}
		sts := r.Net.Statuses()
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
			if t.nat(gating) == string(netns.Cone) && t.nat(i) == string(netns.Cone) && !l.Direct {
				return fmt.Errorf("expert node %d still reached through the relay", i)
			}
		}
		return nil
	})
	if err != nil {
		r.log.Warn("links not settled", "err", err)
	}
	return nil
}

// bootAddr is node 0's TCP address on the public segment.
func (t *Netns) bootAddr(r *Run) string {
	return fmt.Sprintf("/ip4/%s/tcp/4001/p2p/%s", t.net.Publics[0].IP, r.Net.Processes()[0].Status.PeerID)
}

// Ask implements Topology: `neurod generate --network` from the gating
// node's home, so that the client's traffic crosses its NAT too.
func (t *Netns) Ask(ctx context.Context, r *Run) error {
	gctx, cancel := context.WithTimeout(ctx, r.S.Timeout)
	defer cancel()
	var gen *Generation
	var err error
	if t.KillNodes > 0 {
		gen, err = t.generateKilling(gctx, r)
	} else {
		gen, err = t.generate(gctx, r)
	}
	if err != nil {
		return err
	}
	rep := r.Report
	rep.Tokens, rep.Text, rep.PerTokenMs, rep.PromptTokens = gen.Tokens, gen.Text, gen.PerTokenMs, gen.PromptTokens
	rep.PerTokenComputeMs = gen.PerTokenComputeMs
	rep.TokensPerSecond, rep.FinishReason, rep.Requests = gen.TokensPerSecond, gen.FinishReason, 1
	rep.Stats = gen.Stats
	if r.S.Concurrency > 1 {
		return t.concurrent(gctx, r, gen.Tokens)
	}
	return nil
}

// generate asks the prompt once from the gating node's home, through a
// client of its own (neurod generate --network).
func (t *Netns) generate(ctx context.Context, r *Run) (*Generation, error) {
	gens, err := t.generateN(ctx, r, 1)
	if err != nil {
		return nil, err
	}
	return gens[0], nil
}

// generateCmd is `neurod generate --network --json` of the prompt, run in
// the gating node's home, with more flags.
func (t *Netns) generateCmd(ctx context.Context, r *Run, more ...string) *exec.Cmd {
	args := append([]string{"netns", "exec", t.ns(t.Gating()), r.S.Binary, "generate", "--network", "--bootstrap", t.bootAddr(r),
		"--model", r.Model.CID.String(), "--prompt", r.S.Prompt, "--max-tokens", strconv.Itoa(r.S.MaxTokens), "--json"}, more...)
	return exec.CommandContext(ctx, "ip", args...)
}

// generateKilling asks the prompt once from the gating node's home,
// following the generation token by token (generate --progress), and
// SIGKILLs KillNodes expert nodes once it holds KillAfter tokens.
func (t *Netns) generateKilling(ctx context.Context, r *Run) (*Generation, error) {
	doomed := victims(r.Net.Processes()[t.Gating()+1:], t.KillNodes, r.log)
	cmd := t.generateCmd(ctx, r, "--progress")
	var out bytes.Buffer
	cmd.Stdout = &out
	pipe, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("generate from the gating node's home: %w", err)
	}
	// The client's own log lines pass through, kept for the error.
	var gerr strings.Builder
	var killErr error
	sc := bufio.NewScanner(pipe)
	for sc.Scan() {
		var p struct {
			Tokens *int `json:"tokens"`
			Rewind bool `json:"rewind"`
		}
		if json.Unmarshal(sc.Bytes(), &p) != nil || p.Tokens == nil {
			gerr.Write(sc.Bytes())
			gerr.WriteByte('\n')
			continue
		}
		if !p.Rewind && *p.Tokens == t.KillAfter && r.Report.KilledAfter == 0 && killErr == nil {
			if killErr = kill(doomed, r.Report, r.log); killErr == nil {
				r.Report.KilledAfter = t.KillAfter
			}
		}
	}
	if err := cmd.Wait(); err != nil {
		return nil, errors.Join(killErr, fmt.Errorf("generate from the gating node's home: %w: %s", err, strings.TrimSpace(gerr.String())))
	}
	if killErr != nil {
		return nil, killErr
	}
	if r.Report.KilledAfter == 0 {
		return nil, fmt.Errorf("--kill %d@%d: the generation never held %d tokens", t.KillNodes, t.KillAfter, t.KillAfter)
	}
	var gen Generation
	if err := json.Unmarshal(out.Bytes(), &gen); err != nil {
		return nil, fmt.Errorf("generate: %w", err)
	}
	return &gen, nil
}

// generateN asks the prompt n times at once from the gating node's home
// through one client process (neurod generate --network --concurrency):
// clients of their own would each take a connection from one address,
// and libp2p's resource manager admits 8 per address.
func (t *Netns) generateN(ctx context.Context, r *Run, n int) ([]*Generation, error) {
	cmd := t.generateCmd(ctx, r, "--concurrency", strconv.Itoa(n))
	var gerr strings.Builder
	cmd.Stderr = &gerr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("generate from the gating node's home: %w: %s", err, strings.TrimSpace(gerr.String()))
	}
	dec := json.NewDecoder(bytes.NewReader(out))
	gens := make([]*Generation, n)
	for i := range gens {
		gens[i] = &Generation{}
		if err := dec.Decode(gens[i]); err != nil {
			return nil, fmt.Errorf("generate: generation %d of %d: %w", i+1, n, err)
		}
	}
	return gens, nil
}

// concurrent asks the prompt Concurrency times at once through one client
// in the gating node's home (unpaid, as the netns testnet runs), and
// checks every answer has want's tokens. The aggregate is the tokens over
// the longest generation's time (the client's start-up, its DHT lookup,
// left out).
func (t *Netns) concurrent(ctx context.Context, r *Run, want []int32) error {
	n := r.S.Concurrency
	gens, err := t.generateN(ctx, r, n)
	if err != nil {
		return err
	}
	results := make([]Result, n)
	longest := 0.0 // seconds
	for i, g := range gens {
		var took float64
		for _, ms := range g.PerTokenMs {
			took += ms / 1000
		}
		longest = max(longest, took)
		results[i] = Result{Tokens: g.Tokens, PerTokenMs: g.PerTokenMs}
		if g.Stats != nil {
			results[i].MoELayers, results[i].SharedLayers = g.Stats.MoELayers, g.Stats.SharedLayers
		}
	}
	return r.concurrentAnswers(results, make([]error, n), want, longest)
}

// Describe implements Topology: how the gating node reached each expert
// node, and what the lines carried.
func (t *Netns) Describe(_ context.Context, r *Run) error {
	gating := t.Gating()
	idx := map[string]int{}
	for i, st := range r.Net.Statuses() {
		idx[st.PeerID] = i
	}
	gst := r.Net.Statuses()[gating]
	if gst.Gating != nil {
		for _, l := range gst.Gating.Links {
			c := Conn{A: gst.PeerID, B: l.PeerID, Direct: l.Direct, ViaRelay: l.ViaRelay,
				Transport: l.Transport, Calls: l.Calls, NATs: [2]string{t.nat(gating), t.nat(idx[l.PeerID])}}
			if j := idx[l.PeerID] - t.Publics; t.Links != nil && j >= 0 {
				c.RTTMs = ms(t.Links[gating-t.Publics].RTT+t.Links[j].RTT) / 2
			}
			r.Report.Connections = append(r.Report.Connections, c)
		}
	}
	if r.Report.Link != nil {
		r.Report.Link.Lines = t.net.LineStats()
	}
	return nil
}

// Hint implements Topology.
func (t *Netns) Hint(r *Run) []string {
	return []string{fmt.Sprintf("ip netns exec %s %s generate --network --bootstrap %s --model %s --prompt 'Hello'",
		t.ns(t.Gating()), r.S.Binary, t.bootAddr(r), r.Model.CID)}
}
