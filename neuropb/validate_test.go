package neuropb

import (
	"errors"
	"strings"
	"testing"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/multiformats/go-multihash"
	"google.golang.org/protobuf/proto"
)

func testPeer(t testing.TB) peer.ID {
	_, pub, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func TestHeartbeatValidate(t *testing.T) {
	id := testPeer(t)
	addr := ma.StringCast("/ip4/127.0.0.1/tcp/4001").Bytes()
	good := func() *Heartbeat {
		return &Heartbeat{PeerId: []byte(id), Seq: 1, Roles: []Role{Role_ROLE_EXPERT}, Version: "0.1.0", Addrs: [][]byte{addr}}
	}
	tests := []struct {
		name   string
		mutate func(*Heartbeat)
		want   string // substring of the error; "" for valid
	}{
		{"valid", func(*Heartbeat) {}, ""},
		{"bad peer id", func(h *Heartbeat) { h.PeerId = []byte("nope") }, "peer_id"},
		{"empty peer id", func(h *Heartbeat) { h.PeerId = nil }, "peer_id"},
		{"unspecified role", func(h *Heartbeat) { h.Roles = []Role{Role_ROLE_UNSPECIFIED} }, "unknown role"},
		{"unknown role", func(h *Heartbeat) { h.Roles = []Role{Role(99)} }, "unknown role"},
		{"too many roles", func(h *Heartbeat) { h.Roles = make([]Role, MaxRoles+1) }, "roles"},
		{"long version", func(h *Heartbeat) { h.Version = strings.Repeat("v", MaxVersionLen+1) }, "version"},
		{"bad addr", func(h *Heartbeat) { h.Addrs = [][]byte{{0xff, 0xff}} }, "addrs[0]"},
		{"long addr", func(h *Heartbeat) { h.Addrs = [][]byte{make([]byte, MaxAddrLen+1)} }, "addrs[0]"},
		{"bad hosted model", func(h *Heartbeat) { h.Hosted = []*HostedModel{{Model: []byte{9, 9}}} }, "hosted[0]"},
		{"too many hosted models", func(h *Heartbeat) { h.Hosted = make([]*HostedModel, MaxHostedModels+1) }, "hosted models"},
		{"negative speed", func(h *Heartbeat) { h.Capacity = &Capacity{TokensPerSecond: -1} }, "tokens per second"},
		{"valid span", func(h *Heartbeat) {
			h.Hosted = []*HostedModel{{Model: testShard(t).GetCid(), Spans: []*LayerRange{{First: 0, End: 12}}}}
		}, ""},
		{"empty span", func(h *Heartbeat) {
			h.Hosted = []*HostedModel{{Model: testShard(t).GetCid(), Spans: []*LayerRange{{First: 3, End: 3}}}}
		}, "span 0"},
		{"too many spans", func(h *Heartbeat) {
			h.Hosted = []*HostedModel{{Model: testShard(t).GetCid(), Spans: make([]*LayerRange, MaxHostedSpans+1)}}
		}, "spans"},
		{"too many addrs", func(h *Heartbeat) {
			h.Addrs = make([][]byte, MaxHeartbeatAddrs+1)
			for i := range h.Addrs {
				h.Addrs[i] = addr
			}
		}, "addrs"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := good()
			tc.mutate(h)
			err := h.Validate()
			if tc.want == "" {
				if err != nil {
					t.Fatalf("valid heartbeat rejected: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) || !errors.Is(err, ErrInvalid) {
				t.Fatalf("error = %v, want ErrInvalid mentioning %q", err, tc.want)
			}
		})
	}
	var nilHB *Heartbeat
	if err := nilHB.Validate(); !errors.Is(err, ErrInvalid) {
		t.Fatalf("nil heartbeat: %v", err)
	}
}

func TestRoleNames(t *testing.T) {
	names := RoleNames()
	if strings.Join(names, ",") != "bootstrap,relay,gating,expert" {
		t.Fatalf("RoleNames = %v", names)
	}
	for _, n := range names {
		r, err := ParseRole(n)
		if err != nil || RoleString(r) != n {
			t.Fatalf("ParseRole(%q) = %v, %v", n, r, err)
		}
	}
	for _, bad := range []string{"", "unspecified", "miner"} {
		if _, err := ParseRole(bad); err == nil {
			t.Fatalf("ParseRole(%q) accepted", bad)
		}
	}
}

// FuzzHeartbeat feeds arbitrary bytes to the routing topic's decoder: it
// must never panic, and whatever it accepts must re-encode within the size
// limit it was decoded under.
func FuzzHeartbeat(f *testing.F) {
	id := testPeer(f)
	seed, _ := proto.Marshal(&Heartbeat{PeerId: []byte(id), Seq: 7, Roles: []Role{Role_ROLE_GATING},
		Addrs: [][]byte{ma.StringCast("/ip4/1.2.3.4/udp/1/quic-v1").Bytes()}, Load: &Load{Peers: 3}})
	f.Add(seed)
	f.Add([]byte{})
	f.Add([]byte{0x0a, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > MaxHeartbeatSize {
			return
		}
		var h Heartbeat
		if err := proto.Unmarshal(data, &h); err != nil {
			return
		}
		if err := h.Validate(); err != nil {
			return
		}
		if _, err := peer.IDFromBytes(h.GetPeerId()); err != nil {
			t.Fatalf("accepted a heartbeat with a bad peer id: %v", err)
		}
	})
}

// A manifest with dense leading layers lists experts from the first MoE
// layer on; one that lists them from layer 0, or makes every layer dense,
// is refused.
func TestManifestDenseLead(t *testing.T) {
	mk := func(first uint32, dense uint32) *Manifest {
		m := &Manifest{Format: 1, Params: &ModelParams{Layers: 3, Experts: 2, ExpertsUsed: 1, Embd: 8, Heads: 1, DenseLead: dense},
			Gating: testShard(t), TensorOrder: []string{"x"}}
		for l := first; l < 3; l++ {
			for e := range uint32(2) {
				m.Experts = append(m.Experts, &ExpertShardRef{Layer: l, Expert: e, Shard: testShard(t)})
			}
		}
		return m
	}
	if err := mk(1, 1).Validate(); err != nil {
		t.Fatalf("one dense leading layer: %v", err)
	}
	if err := mk(0, 1).Validate(); err == nil {
		t.Fatal("experts listed for the dense layer: accepted")
	}
	if err := mk(3, 3).Validate(); err == nil || !strings.Contains(err.Error(), "dense leading layers") {
		t.Fatalf("every layer dense: %v", err)
	}
}

// testShard is a valid shard reference (CIDv1 raw sha2-256, one tensor).
func testShard(t *testing.T) *ShardRef {
	t.Helper()
	mh, err := multihash.Sum([]byte("shard"), multihash.SHA2_256, -1)
	if err != nil {
		t.Fatal(err)
	}
	return &ShardRef{Cid: cid.NewCidV1(cid.Raw, mh).Bytes(), Size: 1, Tensors: []*TensorRef{{Name: "x", Dtype: 0, Shape: []uint64{1}}}}
}

// A span's layer work counts a multiply and an add per weight of its
// layer shards' matrices (norms and other vectors are not matrix work);
// layers out of the manifest's count nothing.
func TestLayerFLOPsPerToken(t *testing.T) {
	layer := func(l uint32, shapes ...[]uint64) *LayerShardRef {
		ref := &ShardRef{}
		for _, sh := range shapes {
			ref.Tensors = append(ref.Tensors, &TensorRef{Shape: sh})
		}
		return &LayerShardRef{Layer: l, Shard: ref}
	}
	m := &Manifest{Layers: []*LayerShardRef{
		layer(0, []uint64{64, 64}, []uint64{64}, []uint64{64, 16}),
		layer(1, []uint64{64, 8}),
	}}
	if got, want := m.LayerFLOPsPerToken(0, 2), uint64(2*(64*64+64*16)+2*64*8); got != want {
		t.Fatalf("both layers: %d, want %d", got, want)
	}
	if got := m.LayerFLOPsPerToken(1, 5); got != 2*64*8 {
		t.Fatalf("layer 1 and beyond: %d", got)
	}
	if got := (&Manifest{}).LayerFLOPsPerToken(0, 4); got != 0 {
		t.Fatalf("no layer shards: %d", got)
	}
}
