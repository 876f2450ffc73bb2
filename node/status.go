package node

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"time"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/moe"
	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/p2p"
	"github.com/neuro-p2p/neuro/verdict"
)

// StatusPath is the control API's status endpoint.
const StatusPath = "/api/v1/status"

// maxStatusSize bounds a status response read by FetchStatus.
const maxStatusSize = 8 << 20

// Status is a running node's view of itself and the network, served at
// StatusPath as JSON.
type Status struct {
	PeerID  string   `json:"peer_id"`
	Addrs   []string `json:"addrs"`
	Roles   []string `json:"roles"`
	Version string   `json:"version"`
	PID     int      `json:"pid"`
	UptimeS float64  `json:"uptime_s"`
	// RSSBytes is the node process's resident memory.
	RSSBytes uint64 `json:"rss_bytes"`
	// ConnectedPeers counts peers with an open connection.
	ConnectedPeers int `json:"connected_peers"`
	// RoutingTable lists the peers in the DHT routing table.
	RoutingTable []string `json:"routing_table"`
	// Heard lists the peers whose heartbeats arrived within the expiry.
	Heard []HeardPeer `json:"heard"`
	// GossipRejected counts rejected gossip messages: topic -> reason -> n.
	GossipRejected map[string]map[string]uint64 `json:"gossip_rejected"`
	// Experts lists the experts this node serves ("layer:expert"), and
	// ExpertCalls the calls it has answered.
	Experts     []string `json:"experts"`
	ExpertCalls int64    `json:"expert_calls"`
	// Spans lists the layer spans this node serves ("first-last",
	// inclusive), once served.
	Spans []string `json:"spans"`
	// Gating is the gating node's state (absent on other nodes).
	Gating *GatingStatus `json:"gating,omitempty"`
	// Verdicts counts the verdicts this node published and received.
	Verdicts *VerdictStatus `json:"verdicts,omitempty"`
	// Devices are the compute devices the node sees, the one it computes
	// on selected.
	Devices []DeviceStatus `json:"devices"`
}

// GatingStatus is a gating node's state.
type GatingStatus struct {
	// HTTP is the OpenAI-compatible API's host:port ("" when off).
	HTTP string `json:"http"`
	// Active generations, tokens generated since the start, and expert
	// calls hedged to a second provider.
	Active    int64         `json:"active"`
	Queued    int           `json:"queued"`
	Generated int64         `json:"generated"`
	Hedges    int64         `json:"hedges"`
	Models    []GatingModel `json:"models"`
	// Validation counts the expert answers used, the extra calls made to
	// check them, and the results found wrong (absent when off).
	Validation *ValidationStatus `json:"validation,omitempty"`
	// Reputation is this gating node's record of each expert peer.
	Reputation []PeerReputation `json:"reputation"`
	// Links says how this gating node reaches each expert peer it called.
	Links []ExpertLink `json:"links"`
}

// ExpertLink is how a gating node reaches an expert peer.
type ExpertLink struct {
	PeerID string `json:"peer_id"`
	Calls  int64  `json:"calls"`
	// Direct: over a direct connection (hole punched, for a home behind
	// NAT); ViaRelay: through a relay.
	Direct    bool   `json:"direct"`
	ViaRelay  bool   `json:"via_relay"`
	Transport string `json:"transport"`
}

// ValidationStatus counts a gating node's checks.
type ValidationStatus struct {
	Calls  int64 `json:"calls"`
	Checks int64 `json:"checks"`
	Wrong  int64 `json:"wrong"`
	// InFlight counts the checks and probes running now.
	InFlight int64 `json:"in_flight"`
}

// PeerReputation is one peer's reputation record.
type PeerReputation struct {
	PeerID       string  `json:"peer_id"`
	Score        float64 `json:"score"`
	Correctness  float64 `json:"correctness"`
	Timeliness   float64 `json:"timeliness"`
	Speed        float64 `json:"speed"`
	Availability float64 `json:"availability"`
	Checked      uint64  `json:"checked"`
	Failed       uint64  `json:"failed"`
	Excluded     bool    `json:"excluded"`
	// ExcludedAt is how many of its results had been checked when it was
	// excluded.
	ExcludedAt uint64 `json:"excluded_at"`
}

// GatingModel is one model a gating node serves.
type GatingModel struct {
	Model string `json:"model"`
	// Ready once the gating shard is loaded; Error if that failed.
	Ready bool   `json:"ready"`
	Error string `json:"error,omitempty"`
	// Context is a session's KV cache in tokens.
	Context int `json:"context"`
	// LayersLoaded says whether the layers' weights are loaded (false: a
	// head whose generations have all gone through spans, gating.layers
	// "auto").
	LayersLoaded bool `json:"layers_loaded"`
	// MinProviders is the fewest live providers of any expert; Missing
	// lists the experts that have none.
	MinProviders int      `json:"min_providers"`
	Missing      []string `json:"missing"`
}

// HeardPeer is one entry of the heartbeat table.
type HeardPeer struct {
	PeerID        string   `json:"peer_id"`
	Roles         []string `json:"roles"`
	Version       string   `json:"version"`
	Seq           uint64   `json:"seq"`
	UptimeS       uint64   `json:"uptime_s"`
	Heartbeats    uint64   `json:"heartbeats"`
	LastSeenMsAgo int64    `json:"last_seen_ms_ago"`
	// DelayMs is sender clock to receipt for the last heartbeat.
	DelayMs float64 `json:"delay_ms"`
	// HostedExperts counts the experts the peer announces, over all models.
	HostedExperts int `json:"hosted_experts"`
	// Spans lists the layer spans the peer announces ("first-last").
	Spans           []string `json:"spans"`
	QueueDepth      uint32   `json:"queue_depth"`
	TokensPerSecond float32  `json:"tokens_per_second"`
}

// RoleNames converts roles to their short names.
func RoleNames(roles []neuropb.Role) []string {
	out := make([]string, 0, len(roles))
	for _, r := range roles {
		out = append(out, neuropb.RoleString(r))
	}
	return out
}

// Status reports the node's state now.
func (n *Node) Status() Status {
	now := time.Now()
	h := n.p2p
	st := Status{
		PeerID:         h.ID().String(),
		Roles:          RoleNames(h.Roles()),
		Version:        p2p.Version,
		PID:            os.Getpid(),
		UptimeS:        now.Sub(h.Started()).Seconds(),
		RSSBytes:       p2p.ProcessRSS(),
		ConnectedPeers: len(h.LibP2P().Network().Peers()),
		RoutingTable:   []string{},
		Heard:          []HeardPeer{},
		GossipRejected: h.Rejections().Snapshot(),
	}
	for _, a := range h.Addrs() {
		st.Addrs = append(st.Addrs, a.String())
	}
	st.Devices = n.devices()
	for _, p := range h.RoutingTable() {
		st.RoutingTable = append(st.RoutingTable, p.String())
	}
	st.Experts = []string{}
	if n.expert != nil {
		keys := n.expert.Loaded()
		slices.SortFunc(keys, func(a, b expert.Key) int {
			return cmp.Or(cmp.Compare(a.Layer, b.Layer), cmp.Compare(a.Expert, b.Expert))
		})
		for _, k := range keys {
			st.Experts = append(st.Experts, k.String())
		}
		st.ExpertCalls = n.expert.Served()
	}
	st.Spans = []string{}
	if n.spans != nil {
		if p, ok := n.spans.Serving(); ok {
			st.Spans = append(st.Spans, fmt.Sprintf("%d-%d", p.First, p.End-1))
		}
	}
	if n.verdicts != nil {
		vs := n.verdicts.Status()
		st.Verdicts = &vs
	}
	if g := n.gating; g != nil {
		gs := &GatingStatus{HTTP: n.HTTPAddr(), Active: g.Active(), Queued: g.Queued(), Generated: g.Generated(), Hedges: g.Hedges(), Models: []GatingModel{},
			Links: []ExpertLink{}}
		for _, l := range g.Links() {
			gs.Links = append(gs.Links, ExpertLink{PeerID: l.Peer.String(), Calls: l.Calls, Direct: l.Direct, ViaRelay: l.ViaRelay, Transport: l.Transport})
		}
		for _, m := range g.Models() {
			gm := GatingModel{Model: m.CID.String(), Ready: m.Ready, Context: m.Context, LayersLoaded: m.LayersLoaded, MinProviders: m.MinProviders, Missing: []string{}}
			if m.Err != nil {
				gm.Error = m.Err.Error()
			}
			for _, k := range m.Missing {
				gm.Missing = append(gm.Missing, k.String())
			}
			gs.Models = append(gs.Models, gm)
		}
		gs.Reputation = []PeerReputation{}
		if v := g.Validator(); v != nil {
			calls, checks, wrong := v.Stats()
			gs.Validation = &ValidationStatus{Calls: calls, Checks: checks, Wrong: wrong, InFlight: v.InFlight()}
			for _, e := range v.Book().Snapshot() {
				gs.Reputation = append(gs.Reputation, PeerReputation{PeerID: e.Peer.String(), Score: e.Score,
					Correctness: e.Correctness, Timeliness: e.Timeliness, Speed: e.Speed, Availability: e.Availability,
					Checked: e.Checked, Failed: e.Failed, Excluded: e.Excluded, ExcludedAt: e.ExcludedAt})
			}
		}
		st.Gating = gs
	}
	for _, e := range h.Peers().Snapshot(now) {
		hosted := 0
		spans := []string{}
		for _, hm := range e.Hosted {
			hosted += len(hm.GetExperts())
			for _, sp := range hm.GetSpans() {
				spans = append(spans, fmt.Sprintf("%d-%d", sp.GetFirst(), sp.GetEnd()-1))
			}
		}
		st.Heard = append(st.Heard, HeardPeer{
			HostedExperts:   hosted,
			Spans:           spans,
			QueueDepth:      e.Capacity.GetQueueDepth(),
			TokensPerSecond: e.Capacity.GetTokensPerSecond(),
			PeerID:          e.ID.String(),
			Roles:           RoleNames(e.Roles),
			Version:         e.Version,
			Seq:             e.Seq,
			UptimeS:         e.UptimeS,
			Heartbeats:      e.Heard,
			LastSeenMsAgo:   now.Sub(e.LastSeen).Milliseconds(),
			DelayMs:         float64(e.Delay.Microseconds()) / 1000,
		})
	}
	return st
}

func (n *Node) apiHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc(LedgerPath, n.serveLedger)
	mux.HandleFunc(APIKeysPath, n.serveAPIKeys)
	mux.HandleFunc(APIKeysPath+"/", n.serveAPIKeys)
	mux.HandleFunc("GET "+StatePath, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if err := json.NewEncoder(w).Encode(n.State(r.Context())); err != nil {
			n.log.Debug("write state", "err", err)
		}
	})
	mux.HandleFunc("GET "+StatusPath, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if err := json.NewEncoder(w).Encode(n.Status()); err != nil {
			n.log.Debug("write status", "err", err)
		}
	})
	return mux
}

// FetchState asks the node whose control API (or HTTP listener) is on
// addr for the network as it sees it (State).
func FetchState(ctx context.Context, addr string) (State, error) {
	var st State
	if err := getJSON(ctx, addr, StatePath, &st); err != nil {
		return State{}, fmt.Errorf("state %s: %w", addr, err)
	}
	return st, nil
}

func getJSON(ctx context.Context, addr, path string, v any) error {
	_, url := apiURL(addr, path)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := apiDo(addr, req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("HTTP %s", resp.Status)
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxStatusSize)).Decode(v); err != nil {
		return fmt.Errorf("decode: %w", err)
	}
	return nil
}

// FetchStatus asks the node whose control API listens on addr (host:port
// or unix:PATH) for its status.
func FetchStatus(ctx context.Context, addr string) (Status, error) {
	var st Status
	if err := getJSON(ctx, addr, StatusPath, &st); err != nil {
		return Status{}, fmt.Errorf("status %s: %w", addr, err)
	}
	return st, nil
}

// VerdictStatus counts the verdicts a node published and received.
type VerdictStatus = verdict.Status

// devices lists the compute backend's devices, with the expert speed the
// expert service measured on the selected one.
func (n *Node) devices() []DeviceStatus {
	if n.expert != nil {
		hb := &neuropb.Heartbeat{}
		n.expert.HeartbeatExtra(hb)
		if ds := hb.GetCapacity().GetHardware().GetDevices(); len(ds) > 0 {
			return deviceStatuses(ds)
		}
	}
	out := []DeviceStatus{}
	if dl, ok := n.compute.(moe.DeviceLister); ok {
		for _, d := range dl.Devices() {
			out = append(out, DeviceStatus{Backend: d.Backend, Name: d.Name, Description: d.Description, Type: d.Type,
				MemoryTotal: d.MemoryTotal, MemoryFree: d.MemoryFree, Selected: d.Selected})
		}
	}
	return out
}
