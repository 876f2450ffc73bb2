package model

import (
	"bytes"
	"slices"
	"strings"
	"testing"
)

func TestPlantPieces(t *testing.T) {
	got := PlantPieces("llama", "Once upon, once")
	want := []string{"▁O", "▁On", "▁Onc", "▁Once", "▁u", "▁up", "▁upo", "▁upon", "▁upon,", "▁o", "▁on", "▁onc", "▁once"}
	if !slices.Equal(got, want) {
		t.Fatalf("pieces %q, want %q", got, want)
	}
}

// A plant refuses what it cannot make, and the same plant and seed make
// the same bytes.
func TestPlantLimits(t *testing.T) {
	p := Presets["tiny"]
	for _, tc := range []struct {
		text []int32
		want string
	}{
		{nil, "no tokens"},
		{[]int32{300, 301, 300, 302}, "followed once by token 301 and once by token 302"},
		{[]int32{300, 2, 301}, "end-of-text"},
		{[]int32{300, 9999}, "outside the vocabulary"},
		{[]int32{300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312, 313, 314, 315, 316, 317, 318, 319, 320, 321,
			322, 323, 324, 325, 326, 327, 328, 329, 330, 331, 332}, "need embd of at least"},
	} {
		if _, err := newPlant("llama", p, tc.text); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want %q", tc.text, err, tc.want)
		}
	}
	p.Plant = []int32{300, 301, 302}
	var a, b bytes.Buffer
	if err := GenerateArch(&a, "llama", p, Q8_0, 5); err != nil {
		t.Fatal(err)
	}
	if err := GenerateArch(&b, "llama", p, Q8_0, 5); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Fatal("the same plant and seed made different files")
	}
	if got, want := PlantPieces("qwen3moe", "Once upon a time, 42 peers."), []string{"Once", " upon", " a", " time", ",", " 42", " peers", "."}; !slices.Equal(got, want) {
		t.Fatalf("pre-tokens %q, want %q", got, want)
	}
	p.TiedOutput = true
	if err := GenerateArch(&a, "qwen3moe", p, Q8_0, 5); err == nil {
		t.Fatal("a planted model without an output head was made")
	}
}
