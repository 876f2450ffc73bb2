package model

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/neuro-p2p/neuro/neuropb"
)

// Info is what `neurod model info` prints of a model: its shape, its
// tensor types and what hosting it takes.
type Info struct {
	Architecture string `json:"architecture"`
	Layers       int    `json:"layers"`
	// MoELayers have experts; DenseLayers (leading ones, in GLM and
	// DeepSeek) have a plain feed-forward block instead.
	MoELayers     int `json:"moe_layers"`
	DenseLayers   int `json:"dense_layers"`
	Experts       int `json:"experts"`
	ExpertsUsed   int `json:"experts_used"`
	SharedExperts int `json:"shared_experts"`
	Embd          int `json:"embd"`
	FF            int `json:"ff"`
	Heads         int `json:"heads"`
	KVHeads       int `json:"kv_heads"`
	Vocab         int `json:"vocab"`
	Context       int `json:"context"`
	// Types counts the tensors of each type ("q4_k": 24).
	Types map[string]int `json:"types"`
	// ExpertTypes counts the experts by their gate/up/down types
	// ("q4_k/q4_k/q6_k": 12).
	ExpertTypes map[string]int `json:"expert_types"`
	// Bytes: the whole model; the gating part (everything but the
	// experts); one expert, smallest and largest; and the largest layer's
	// experts, which is what a node needs to host a whole layer.
	TotalBytes       uint64 `json:"total_bytes"`
	GatingBytes      uint64 `json:"gating_bytes"`
	ExpertBytesMin   uint64 `json:"expert_bytes_min"`
	ExpertBytesMax   uint64 `json:"expert_bytes_max"`
	LayerExpertBytes uint64 `json:"layer_expert_bytes"`
	// SharedRemote: the shared experts have shards of their own, hosted
	// and called like routed experts (set from a manifest).
	SharedRemote bool `json:"shared_remote,omitempty"`
	// Shards is how many shards a split makes (the gating one and one per
	// expert); set from a manifest.
	Shards int `json:"shards,omitempty"`
	// ExpertFLOPsPerToken is the expert work of one token, as expert nodes
	// count it in their receipts (what a request pays for): three matrix
	// products of embd x ff per expert used in each MoE layer.
	ExpertFLOPsPerToken uint64 `json:"expert_flops_per_token"`
	// CostPer1kTokens is what 1,000 tokens cost at the ledger's default
	// price, in NEURO (filled in by neurod).
	CostPer1kTokens float64 `json:"cost_per_1k_tokens"`
}

// setFLOPs fills ExpertFLOPsPerToken once MoELayers is known.
func (in *Info) setFLOPs() {
	in.ExpertFLOPsPerToken = 6 * uint64(in.Embd) * uint64(in.FF) * uint64(in.ExpertsUsed) * uint64(in.MoELayers)
}

// InfoOfFile describes the GGUF f (sizes are of the tensor data; a shard
// adds a small header).
func InfoOfFile(f *File) (*Info, error) {
	arch, _ := f.Get("general.architecture").(string)
	p, err := readParams(f, arch)
	if err != nil {
		return nil, err
	}
	in := infoOfParams(arch, p)
	in.SharedExperts = sharedExperts(f, arch)
	// Per layer: the expert tensors' bytes, and each expert's types.
	type layer struct {
		bytes uint64
		types [3]DType
	}
	layers := map[int]*layer{}
	for _, t := range f.Tensors {
		in.Types[t.Type.String()]++
		in.TotalBytes += t.Size()
		m := expertTensor.FindStringSubmatch(t.Name)
		if m == nil {
			in.GatingBytes += t.Size()
			continue
		}
		l, _ := strconv.Atoi(m[1])
		if layers[l] == nil {
			layers[l] = &layer{}
		}
		layers[l].bytes += t.Size()
		if m[3] == "weight" { // the types of the weights, not of gpt-oss's f32 biases
			layers[l].types[map[string]int{"gate": 0, "up": 1, "down": 2}[m[2]]] = t.Type
		}
	}
	in.MoELayers, in.DenseLayers = len(layers), in.Layers-len(layers)
	for _, l := range layers {
		per := l.bytes / uint64(max(in.Experts, 1))
		in.LayerExpertBytes = max(in.LayerExpertBytes, l.bytes)
		if in.ExpertBytesMin == 0 || per < in.ExpertBytesMin {
			in.ExpertBytesMin = per
		}
		in.ExpertBytesMax = max(in.ExpertBytesMax, per)
		in.ExpertTypes[fmt.Sprintf("%s/%s/%s", l.types[0], l.types[1], l.types[2])] += in.Experts
	}
	in.setFLOPs()
	return in, nil
}

// InfoOfManifest describes a split model from its manifest (sizes are the
// shards').
func InfoOfManifest(m *neuropb.Manifest) *Info {
	in := infoOfParams(m.GetArchitecture(), m.GetParams())
	count := func(ref *neuropb.ShardRef) {
		for _, t := range ref.GetTensors() {
			in.Types[DType(t.GetDtype()).String()]++
		}
		in.TotalBytes += ref.GetSize()
	}
	count(m.GetGating())
	in.GatingBytes = m.GetGating().GetSize()
	for _, t := range m.GetGating().GetTensors() {
		if sharedExpertTensor.MatchString(t.GetName()) {
			in.SharedExperts = max(in.SharedExperts, 1)
		}
	}
	for _, sh := range m.GetShared() { // shared experts hosted like routed ones
		count(sh.GetShard())
		in.SharedExperts = max(in.SharedExperts, 1)
		in.SharedRemote = true
	}
	perLayer := map[uint32]uint64{}
	for _, e := range m.GetExperts() {
		count(e.GetShard())
		size := e.GetShard().GetSize()
		perLayer[e.GetLayer()] += size
		if in.ExpertBytesMin == 0 || size < in.ExpertBytesMin {
			in.ExpertBytesMin = size
		}
		in.ExpertBytesMax = max(in.ExpertBytesMax, size)
		var ts []string
		for _, t := range e.GetShard().GetTensors() {
			if strings.HasSuffix(t.GetName(), ".weight") { // not gpt-oss's f32 biases
				ts = append(ts, DType(t.GetDtype()).String())
			}
		}
		in.ExpertTypes[strings.Join(ts, "/")]++
	}
	for _, b := range perLayer {
		in.LayerExpertBytes = max(in.LayerExpertBytes, b)
	}
	in.MoELayers, in.DenseLayers = len(perLayer), in.Layers-len(perLayer)
	in.Shards = 1 + len(m.GetExperts()) + len(m.GetShared())
	in.ExpertFLOPsPerToken = m.ExpertFLOPsPerToken() // with the hosted shared experts' work
	return in
}

// sharedExperts is the model's shared expert count: the metadata's, else 1
// when shared-expert tensors are there.
func sharedExperts(f *File, arch string) int {
	if v, ok := f.Get(arch + ".expert_shared_count").(uint32); ok {
		return int(v)
	}
	for _, t := range f.Tensors {
		if sharedExpertTensor.MatchString(t.Name) {
			return 1
		}
	}
	return 0
}

func infoOfParams(arch string, p *neuropb.ModelParams) *Info {
	return &Info{Architecture: arch, Layers: int(p.GetLayers()), Experts: int(p.GetExperts()), ExpertsUsed: int(p.GetExpertsUsed()),
		Embd: int(p.GetEmbd()), FF: int(p.GetFf()), Heads: int(p.GetHeads()), KVHeads: int(p.GetKvHeads()),
		Vocab: int(p.GetVocab()), Context: int(p.GetContext()), Types: map[string]int{}, ExpertTypes: map[string]int{}}
}
