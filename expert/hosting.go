package expert

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/neuropb"
)

// Key names one expert of a model: (layer, expert).
type Key struct{ Layer, Expert int }

func (k Key) String() string { return fmt.Sprintf("%d:%d", k.Layer, k.Expert) }

// compareKeys orders keys by layer, then expert.
func compareKeys(a, b Key) int {
	return cmp.Or(cmp.Compare(a.Layer, b.Layer), cmp.Compare(a.Expert, b.Expert))
}

// Spec says which experts a node hosts: a list, or Auto.
type Spec struct {
	Auto bool
	// Experts, when not Auto: every (layer, expert) listed.
	Experts []Key
	// wildcard layers ("1:*") are resolved against the manifest.
	wholeLayers []int
	// spanFirst, spanEnd: a span's layers, whose every expert is hosted
	// (dense leading layers have none); spanAuto: chosen by ChooseSpan.
	spanFirst, spanEnd int
	spanAuto           bool
	// spanElsewhere: the span's experts are not added; the span node
	// calls those it does not host on other nodes.
	spanElsewhere bool
}

// WithSpanExpertsElsewhere is sp whose span (WithSpan, WithAutoSpan) adds
// no expert: the span node computes its layers' attention and routers,
// and calls the experts it does not host anyway on other nodes (an
// automatic span is then chosen by the layer shards' size alone).
func (sp Spec) WithSpanExpertsElsewhere() Spec {
	sp.spanElsewhere = true
	return sp
}

// WithSpan is sp with every expert of layers [first, end) added, the
// experts a span of those layers computes (a dense leading layer among
// them adds none).
func (sp Spec) WithSpan(first, end int) Spec {
	sp.spanFirst, sp.spanEnd = first, end
	return sp
}

// WithAutoSpan is sp with the experts of a span the node chooses once it
// has the manifest (ChooseSpan) added.
func (sp Spec) WithAutoSpan() Spec {
	sp.spanAuto = true
	return sp
}

// ChooseSpan picks the layers [first, end) an automatic span node hosts:
// the longest run of consecutive layers whose weights (the layer shard and,
// withExperts, every expert of the layer) fit budget (0: no bound), among
// runs as long those whose layers the fewest announced spans cover (spans:
// [first, end) → providers), then the earliest. ok is false when not even
// one layer fits.
func ChooseSpan(m *neuropb.Manifest, budget int64, spans map[[2]int]int, withExperts bool) (first, end int, ok bool) {
	layers := int(m.GetParams().GetLayers())
	cost := make([]int64, layers)
	for l := range layers {
		cost[l] = int64(m.LayerRef(l).GetSize())
	}
	for _, e := range m.AllExperts() {
		if withExperts {
			cost[e.GetLayer()] += int64(e.GetShard().GetSize())
		}
	}
	covered := make([]int, layers)
	for r, n := range spans {
		for l := max(r[0], 0); l < min(r[1], layers); l++ {
			covered[l] += n
		}
	}
	bestLen, bestCover := 0, 0
	for a := range layers {
		var used int64
		cover := 0
		for b := a; b < layers; b++ {
			used += cost[b]
			if budget > 0 && used > budget {
				break
			}
			cover += covered[b]
			n := b - a + 1
			if n > bestLen || (n == bestLen && cover < bestCover) {
				first, end, bestLen, bestCover = a, b+1, n, cover
			}
		}
	}
	return first, end, bestLen > 0
}

// ParseSpec parses an --experts value: "auto", "none", or a
// comma-separated list of layer:expert items where expert may be * (the
// whole layer), e.g. "0:3,0:5,1:*".
func ParseSpec(s string) (Spec, error) {
	s = strings.TrimSpace(s)
	switch s {
	case "auto":
		return Spec{Auto: true}, nil
	case "none":
		return Spec{}, nil
	}
	if s == "" {
		return Spec{}, errors.New("empty expert list (want e.g. 0:3,1:*, auto or none)")
	}
	var sp Spec
	seen := map[Key]bool{}
	for _, item := range strings.Split(s, ",") {
		item = strings.TrimSpace(item)
		ls, es, ok := strings.Cut(item, ":")
		if !ok {
			return Spec{}, fmt.Errorf("%q: want layer:expert", item)
		}
		layer, err := strconv.Atoi(ls)
		if err != nil || layer < 0 {
			return Spec{}, fmt.Errorf("%q: layer %q is not a non-negative number", item, ls)
		}
		if es == "*" {
			sp.wholeLayers = append(sp.wholeLayers, layer)
			continue
		}
		e, err := strconv.Atoi(es)
		if err != nil || e < 0 {
			return Spec{}, fmt.Errorf("%q: expert %q is not a non-negative number or *", item, es)
		}
		k := Key{layer, e}
		if !seen[k] {
			seen[k] = true
			sp.Experts = append(sp.Experts, k)
		}
	}
	return sp, nil
}

// Resolve lists the spec's experts for a model, checking them against its
// manifest. Auto specs are resolved by Choose instead.
func (sp Spec) Resolve(m *neuropb.Manifest) ([]Key, error) {
	if sp.Auto {
		return nil, errors.New("auto: use Choose")
	}
	layers, experts := int(m.GetParams().GetLayers()), m.ExpertsPerLayer()
	first, _ := m.MoELayers()
	seen := map[Key]bool{}
	var out []Key
	add := func(k Key) error {
		if k.Layer >= layers || k.Expert >= experts {
			return fmt.Errorf("expert %s: the model has %d layers of %d experts", k, layers, experts)
		}
		if k.Layer < first {
			return fmt.Errorf("expert %s: layer %d is dense (the first %d layers have no experts)", k, k.Layer, first)
		}
		if !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
		return nil
	}
	for _, l := range sp.wholeLayers {
		for e := range experts {
			if err := add(Key{l, e}); err != nil {
				return nil, err
			}
		}
	}
	for _, k := range sp.Experts {
		if err := add(k); err != nil {
			return nil, err
		}
	}
	for l := max(sp.spanFirst, first); l < sp.spanEnd && !sp.spanElsewhere; l++ {
		for e := range experts {
			if err := add(Key{l, e}); err != nil {
				return nil, err
			}
		}
	}
	slices.SortFunc(out, compareKeys)
	return out, nil
}

// Choice is the input of one automatic hosting step.
type Choice struct {
	Manifest *neuropb.Manifest
	// Providers counts the other nodes known to host each expert (DHT
	// provider records and heartbeats).
	Providers map[Key]int
	// FullHosts is how many of those claim every expert of the model
	// (counted in each of Providers): a big node, or Sybils claiming
	// everything. rebalance discounts them where a count, not a
	// comparison of counts, matters.
	FullHosts int
	// Hosted are the experts this node already hosts.
	Hosted map[Key]bool
	// Budget is the memory left for expert weights, in bytes.
	Budget int64
	// Self orders ties differently on every node, so that nodes choosing
	// at the same time spread over the experts.
	Self peer.ID
}

// Choose returns what to host next: the experts with the fewest providers
// that fit the budget. It prefers a whole layer (all of its experts not yet
// hosted) when one fits, because a token's top-k experts in a layer then
// cost one round trip instead of k; otherwise it takes the single expert
// with the fewest providers. Nil means nothing more fits or is needed.
// Call it repeatedly, publishing what was chosen in between, so that other
// nodes see the choice.
func Choose(c Choice) []Key {
	experts := c.Manifest.ExpertsPerLayer() // a hosted shared expert too
	first, end := c.Manifest.MoELayers()
	size := func(k Key) int64 {
		return int64(c.Manifest.ExpertRef(k.Layer, k.Expert).GetShard().GetSize())
	}
	tie := func(k Key) uint64 {
		h := sha256.Sum256([]byte(fmt.Sprintf("%s/%d/%d", c.Self, k.Layer, k.Expert)))
		return binary.BigEndian.Uint64(h[:8])
	}
	// Whole layers first: the layer whose least-provided expert has the
	// fewest providers, if all of its missing experts fit.
	type layerCand struct {
		layer, minProv int
		need           []Key
		bytes          int64
		tie            uint64
	}
	var lc []layerCand
	neediest := int(^uint(0) >> 1) // the fewest providers of any expert this node lacks
	for l := first; l < end; l++ {
		cand := layerCand{layer: l, minProv: int(^uint(0) >> 1), tie: tie(Key{l, -1})}
		for e := range experts {
			k := Key{l, e}
			cand.minProv = min(cand.minProv, c.Providers[k])
			if !c.Hosted[k] {
				cand.need = append(cand.need, k)
				cand.bytes += size(k)
				neediest = min(neediest, c.Providers[k])
			}
		}
		if len(cand.need) > 0 && cand.bytes <= c.Budget {
			lc = append(lc, cand)
		}
	}
	// A whole layer only while it is among the neediest: when the neediest
	// layer does not fit, take its experts one by one instead of a layer
	// that is better provided (else a node that dropped one expert to
	// make room would take the same expert back, round after round).
	lc = slices.DeleteFunc(lc, func(x layerCand) bool { return x.minProv > neediest })
	if len(lc) > 0 {
		best := slices.MinFunc(lc, func(a, b layerCand) int { return cmp.Or(cmp.Compare(a.minProv, b.minProv), cmp.Compare(a.tie, b.tie)) })
		return best.need
	}
	var singles []Key
	for l := first; l < end; l++ {
		for e := range experts {
			k := Key{l, e}
			if !c.Hosted[k] && size(k) <= c.Budget {
				singles = append(singles, k)
			}
		}
	}
	if len(singles) == 0 {
		return nil
	}
	best := slices.MinFunc(singles, func(a, b Key) int {
		return cmp.Or(cmp.Compare(c.Providers[a], c.Providers[b]), cmp.Compare(tie(a), tie(b)))
	})
	return []Key{best}
}
