package ggml

import (
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
)

// Backend is the ggml compute backend: experts, the gating compute and
// llama.cpp's tokenizer. The binary hands it to the node at its
// composition root; its zero value is ready to use and computes on the CPU.
type Backend struct {
	// Device is where experts and the gating compute run (SelectDevice).
	Device Device
}

var (
	_ moe.Backend      = Backend{}
	_ moe.DeviceLister = Backend{}
	_ moe.WaitPoller   = Backend{}
)

// Devices implements moe.DeviceLister: every device ggml sees now (the
// CPU, and those of the GPU backends loaded), the one b computes on
// selected.
func (b Backend) Devices() []moe.DeviceInfo {
	var out []moe.DeviceInfo
	for _, d := range Devices() {
		out = append(out, moe.DeviceInfo{Backend: d.Backend, Name: d.Name, Description: d.Description, Type: d.Type,
			MemoryFree: d.MemoryFree, MemoryTotal: d.MemoryTotal, Selected: d.Name == b.Device.Name || (d.CPU() && b.Device.CPU())})
	}
	return out
}

// NewExpert implements moe.ExpertLoader.
func (b Backend) NewExpert(w moe.ExpertWeights, o moe.ExpertOptions) (moe.Expert, error) {
	e, err := NewExpertOn(b.Device, w, o)
	if err != nil {
		return nil, err
	}
	return e, nil
}

// NewGating implements moe.GatingLoader.
func (b Backend) NewGating(hp moe.Hparams, shard *model.Shard, threads int) (moe.Gating, error) {
	g, err := NewGatingOn(b.Device, hp, shard, threads)
	if err != nil {
		return nil, err
	}
	return gatingIface{g}, nil
}

// NewGatingPart implements moe.PartLoader.
func (b Backend) NewGatingPart(hp moe.Hparams, t moe.Tensors, part moe.Part, threads int) (moe.Gating, error) {
	g, err := NewGatingPart(b.Device, hp, t, part, threads)
	if err != nil {
		return nil, err
	}
	return gatingIface{g}, nil
}

// LoadVocab implements moe.GatingLoader.
func (Backend) LoadVocab(path string) (moe.Vocab, error) {
	l, err := LoadVocab(path)
	if err != nil {
		return nil, err
	}
	return l, nil
}

// Quantize implements moe.Quantizer.
func (Backend) Quantize(t model.DType, x []float32, rowLen int) ([]byte, error) {
	return Quantize(t, x, rowLen)
}

// Dequantize implements moe.Quantizer.
func (Backend) Dequantize(t model.DType, b []byte) ([]float32, error) { return Dequantize(t, b) }

// gatingIface gives *Gating the moe.Gating method set (its NewSession
// returns the concrete *Session).
type gatingIface struct{ *Gating }

var (
	_ moe.SessionSizer  = gatingIface{}
	_ moe.Lockstepper   = gatingIface{}
	_ moe.HeadSessioner = gatingIface{}
	_ moe.PartLoader    = Backend{}
	_ moe.Steps         = (*Session)(nil)
)

func (g gatingIface) NewSession(nCtx int) (moe.Session, error) {
	s, err := g.Gating.NewSession(nCtx)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// NewHeadSession implements moe.HeadSessioner.
func (g gatingIface) NewHeadSession(nCtx int) (moe.Session, error) {
	s, err := g.Gating.NewHeadSession(nCtx)
	if err != nil {
		return nil, err
	}
	return s, nil
}

var (
	_ moe.Session = (*Session)(nil)
	_ moe.Vocab   = (*Llama)(nil)
	_ moe.Expert  = (*Expert)(nil)
)
