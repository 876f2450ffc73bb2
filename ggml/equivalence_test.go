package ggml

import (
	"math"
	"path/filepath"
	"testing"

	"github.com/neuro-p2p/neuro/model"
)

// The split forward pass (gating compute + in-process experts, loaded from
// CID-verified shards) against llama.cpp's own forward pass on the same
// GGUF: greedy tokens identical for 64 tokens, last-token logits within
// 1e-3 (the bound, for F32; the other dtypes are held to it too).
func TestSplitMatchesLlamaCpp(t *testing.T) {
	const maxTokens = 64
	prompt := "once upon a time the expert network"
	for _, dt := range []model.DType{model.F32, model.F16, model.Q8_0, model.Q4_0} {
		t.Run(dt.String(), func(t *testing.T) {
			path := tinyModel(t, dt, 1234)
			ref, err := LoadLlama(path)
			if err != nil {
				t.Fatal(err)
			}
			defer ref.Close()
			want, err := ref.GenerateGreedy(prompt, maxTokens, ContextOptions{Threads: 2}, true)
			if err != nil {
				t.Fatal(err)
			}
			dir := filepath.Join(t.TempDir(), "shards")
			res, err := model.Split(path, dir)
			if err != nil {
				t.Fatal(err)
			}
			sm, err := LoadSplit(dir, res.ModelCID, 2)
			if err != nil {
				t.Fatal(err)
			}
			defer sm.Close()
			got, err := sm.GenerateGreedy(t.Context(), prompt, maxTokens, 0, nil, true)
			if err != nil {
				t.Fatal(err)
			}
			if len(got.Tokens) != len(want.Tokens) {
				t.Fatalf("split generated %d tokens, llama.cpp %d", len(got.Tokens), len(want.Tokens))
			}
			for i := range want.Tokens {
				if got.Tokens[i] != want.Tokens[i] {
					t.Fatalf("token %d: split %d, llama.cpp %d\nsplit %v\nllama %v", i, got.Tokens[i], want.Tokens[i], got.Tokens, want.Tokens)
				}
			}
			var worst, worstAny float64
			for step := range want.Logits {
				for i := range want.Logits[step] {
					d := math.Abs(float64(got.Logits[step][i] - want.Logits[step][i]))
					worstAny = max(worstAny, d)
					if step == len(want.Logits)-1 {
						worst = max(worst, d)
					}
				}
			}
			t.Logf("%s: %d tokens identical; last-token logits max |Δ| = %.3g (any step: %.3g)", dt, len(want.Tokens), worst, worstAny)
			if worst > 1e-3 {
				t.Fatalf("last-token logits differ by %.3g, above 1e-3", worst)
			}
		})
	}
}
