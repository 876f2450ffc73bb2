package ggml

import (
	"bytes"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/neuro-p2p/neuro/model"
)

// The type mixes people download, made by llama.cpp's own quantizer from
// one F16 model whose rows fit every block size (256): each splits, joins
// back to the same bytes, and the split forward pass gives llama.cpp's
// greedy tokens with logits identical to the last bit. The Q4_K_M file
// shows the mix: experts whose down tensor is Q6_K beside gate and up in
// Q4_K.
func TestQuantizedMixesMatchLlamaCpp(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "f16.gguf")
	p := model.Presets["tiny"]
	p.Layers, p.Embd, p.FF = 3, 256, 512
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := model.Generate(f, p, model.F16, 99); err != nil {
		t.Fatal(err)
	}
	f.Close()
	const prompt, maxTokens = "once upon a time", 24
	for _, typ := range []string{"q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "q8_0", "bf16", "iq4_xs", "iq4_nl", "iq3_s", "iq3_m", "mxfp4", "tq1_0", "tq2_0"} {
		t.Run(typ, func(t *testing.T) {
			path := filepath.Join(dir, typ+".gguf")
			if err := QuantizeModel(src, path, typ, 2); err != nil {
				t.Fatal(err)
			}
			shards := filepath.Join(dir, typ)
			res, err := model.Split(path, shards)
			if err != nil {
				t.Fatal(err)
			}
			mix := map[string]int{}
			for _, e := range res.Manifest.GetExperts() {
				var ts []string
				for _, tr := range e.GetShard().GetTensors() {
					ts = append(ts, model.DType(tr.GetDtype()).String())
				}
				mix[strings.Join(ts, "/")]++
			}
			if typ == "q4_k_m" && (mix["q4_k/q4_k/q6_k"] == 0 || mix["q4_k/q4_k/q4_k"] == 0) {
				t.Fatalf("q4_k_m experts (gate/up/down): %v, want both the Q6_K and the Q4_K down", mix)
			}
			joined := filepath.Join(dir, typ+"-joined.gguf")
			if err := model.Join(shards, res.ModelCID, joined); err != nil {
				t.Fatal(err)
			}
			a, _ := os.ReadFile(path)
			b, _ := os.ReadFile(joined)
			if !bytes.Equal(a, b) {
				t.Fatal("split then join does not give back the file")
			}
			ref, err := LoadLlama(path)
			if err != nil {
				t.Fatal(err)
			}
			defer ref.Close()
			want, err := ref.GenerateGreedy(prompt, maxTokens, ContextOptions{Threads: testThreads}, true)
			if err != nil {
				t.Fatal(err)
			}
			sm, err := LoadSplit(shards, res.ModelCID, testThreads)
			if err != nil {
				t.Fatal(err)
			}
			defer sm.Close()
			got, err := sm.GenerateGreedy(t.Context(), prompt, maxTokens, 0, nil, true)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got.Tokens, want.Tokens) {
				t.Fatalf("split %v, llama.cpp %v", got.Tokens, want.Tokens)
			}
			var worst float64
			for step := range want.Logits {
				for i := range want.Logits[step] {
					worst = max(worst, math.Abs(float64(got.Logits[step][i]-want.Logits[step][i])))
				}
			}
			t.Logf("%s: experts %v; %d tokens identical, logits max |Δ| %.3g", typ, mix, len(want.Tokens), worst)
			if worst != 0 {
				t.Fatalf("logits differ by up to %.3g; the arithmetic is llama.cpp's, 0 expected", worst)
			}
		})
	}
	// Types that need an importance matrix, and names that are no type,
	// are refused before llama.cpp is called.
	for typ, want := range map[string]string{"iq2_xxs": "importance matrix", "iq3_xxs": "importance matrix", "q9_k": "want one of"} {
		if err := QuantizeModel(src, filepath.Join(dir, "x.gguf"), typ, 1); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v", typ, err)
		}
	}
}

// Every type neuro reads has ggml's block size, byte size and name.
func TestDTypesMatchGGML(t *testing.T) {
	for _, dt := range model.DTypes() {
		blck, size, name := ggmlTypeInfo(dt)
		if uint64(blck) != dt.BlockSize() || uint64(size) != dt.RowSize(dt.BlockSize()) || !strings.EqualFold(name, dt.String()) {
			t.Errorf("%s: neuro %d elements in %d bytes, ggml %s %d in %d", dt, dt.BlockSize(), dt.RowSize(dt.BlockSize()), name, blck, size)
		}
	}
}

// llama.cpp's writer drops the trailing dimension of 1 from the expert
// tensors of a one-expert model; the split takes them as one expert each.
func TestSplitOneExpertModel(t *testing.T) {
	dir := t.TempDir()
	src, q := filepath.Join(dir, "f16.gguf"), filepath.Join(dir, "q.gguf")
	p := model.Presets["tiny"]
	p.Experts, p.ExpertsUsed, p.Embd, p.FF = 1, 1, 256, 256
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := model.Generate(f, p, model.F16, 4); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := QuantizeModel(src, q, "q8_0", 1); err != nil {
		t.Fatal(err)
	}
	res, err := model.Split(q, filepath.Join(dir, "shards"))
	if err != nil {
		t.Fatal(err)
	}
	if n := len(res.Manifest.GetExperts()); n != p.Layers {
		t.Fatalf("%d expert shards, want %d", n, p.Layers)
	}
	ref, err := LoadLlama(q)
	if err != nil {
		t.Fatal(err)
	}
	defer ref.Close()
	want, err := ref.GenerateGreedy("one expert", 8, ContextOptions{Threads: 1}, false)
	if err != nil {
		t.Fatal(err)
	}
	sm, err := LoadSplit(filepath.Join(dir, "shards"), res.ModelCID, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer sm.Close()
	got, err := sm.GenerateGreedy(t.Context(), "one expert", 8, 0, nil, false)
	if err != nil || !slices.Equal(got.Tokens, want.Tokens) {
		t.Fatalf("split %v (%v), llama.cpp %v", got.Tokens, err, want.Tokens)
	}
}
