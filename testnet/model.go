package testnet

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/ipfs/go-cid"

	"github.com/neuro-p2p/neuro/internal/atomicfile"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/neuropb"
)

// Seed and preset of the model a scenario generates when given none.
const (
	DefaultModelSeed   = 1
	DefaultModelPreset = "tiny"
)

// Model is the model a testnet serves, split for node 0's store.
type Model struct {
	// Path is the GGUF file.
	Path     string
	CID      cid.Cid
	Manifest *neuropb.Manifest
	// Shards is the directory of the split.
	Shards string
}

// Layers and Experts are the model's MoE shape.
func (m *Model) Layers() int { return int(m.Manifest.GetParams().GetLayers()) }

// FirstMoELayer is the first layer with experts (leading layers may be
// dense).
func (m *Model) FirstMoELayer() int { return int(m.Manifest.GetParams().GetDenseLead()) }
func (m *Model) Experts() int       { return m.Manifest.ExpertsPerLayer() } // a hosted shared expert too

// PrepareModel splits the GGUF at path into dir/shards; with no path it
// first generates the tiny model at dir/model.gguf (kept across runs of
// the same dir).
func PrepareModel(dir, path string, log *slog.Logger, o model.SplitOptions) (*Model, error) {
	if path == "" {
		path = filepath.Join(dir, "model.gguf")
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			log.Info("generating the tiny test model", "preset", DefaultModelPreset, "seed", DefaultModelSeed, "file", path)
			var buf bytes.Buffer
			if err := model.Generate(&buf, model.Presets[DefaultModelPreset], model.Q8_0, DefaultModelSeed); err != nil {
				return nil, fmt.Errorf("testnet: generate model: %w", err)
			}
			if err := atomicfile.Write(path, buf.Bytes(), 0o644); err != nil {
				return nil, fmt.Errorf("testnet: generate model: %w", err)
			}
		}
	}
	shards := filepath.Join(dir, "shards")
	if err := os.RemoveAll(shards); err != nil {
		return nil, fmt.Errorf("testnet: %w", err)
	}
	res, err := model.SplitWith(path, shards, o)
	if err != nil {
		return nil, fmt.Errorf("testnet: model %s: %w", path, err)
	}
	return &Model{Path: path, CID: res.ModelCID, Manifest: res.Manifest, Shards: shards}, nil
}
