package model

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"testing"
)

func genTiny(t testing.TB, dt DType, seed uint64) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := Generate(&buf, Presets["tiny"], dt, seed); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestGenerateDeterministicAndReadable(t *testing.T) {
	for _, dt := range []DType{F32, F16, Q8_0, Q4_0} {
		t.Run(dt.String(), func(t *testing.T) {
			a, b := genTiny(t, dt, 7), genTiny(t, dt, 7)
			if sha256.Sum256(a) != sha256.Sum256(b) {
				t.Fatal("same seed gave different bytes")
			}
			if c := genTiny(t, dt, 8); bytes.Equal(a, c) {
				t.Fatal("different seeds gave the same bytes")
			}
			f, err := ReadFile(bytes.NewReader(a), int64(len(a)))
			if err != nil {
				t.Fatal(err)
			}
			p := Presets["tiny"]
			if want := 3 + 10*p.Layers; len(f.Tensors) != want {
				t.Fatalf("%d tensors, want %d", len(f.Tensors), want)
			}
			gate, ok := f.Tensor("blk.1.ffn_gate_exps.weight")
			if !ok || gate.Type != dt || len(gate.Shape) != 3 || gate.Shape[2] != uint64(p.Experts) {
				t.Fatalf("gate exps = %+v", gate)
			}
			if toks, _ := f.Get("tokenizer.ggml.tokens").([]string); len(toks) != p.Vocab || toks[259] != "▁" {
				t.Fatalf("tokens: %d", len(toks))
			}
			if r, _ := f.Get("llama.attention.layer_norm_rms_epsilon").(float32); r != p.RMSEps {
				t.Fatalf("rms eps %v", r)
			}
		})
	}
}

// Reading then rewriting a file with the same KVs and tensors in the same
// order reproduces it byte for byte.
func TestGGUFRoundTrip(t *testing.T) {
	src := genTiny(t, Q8_0, 3)
	f, err := ReadFile(bytes.NewReader(src), int64(len(src)))
	if err != nil {
		t.Fatal(err)
	}
	var tds []TensorData
	for _, ti := range f.Tensors {
		tds = append(tds, TensorData{Info: ti, Data: f.TensorReader(bytes.NewReader(src), ti)})
	}
	var out bytes.Buffer
	if err := Write(&out, f.KVs, tds); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), src) {
		t.Fatal("rewrite differs from the original")
	}
}

func TestReadFileRejects(t *testing.T) {
	good := genTiny(t, F32, 1)
	tests := []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"not gguf", []byte("this is not a model file at all")},
		{"truncated header", good[:100]},
		{"truncated data", good[:len(good)-1]},
		{"huge kv count", append(append([]byte{}, good[:16]...), 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := ReadFile(bytes.NewReader(tc.data), int64(len(tc.data))); !errors.Is(err, ErrFormat) {
				t.Fatalf("error = %v, want ErrFormat", err)
			}
		})
	}
}

// FuzzReadFile: no input crashes the GGUF reader or makes it allocate more
// than the input could describe.
func FuzzReadFile(f *testing.F) {
	f.Add(genTiny(f, Q4_0, 1)[:4096])
	f.Add([]byte("GGUF\x03\x00\x00\x00"))
	f.Fuzz(func(t *testing.T, data []byte) {
		gf, err := ReadFile(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			return
		}
		for _, ti := range gf.Tensors {
			if gf.DataOffset+int64(ti.Offset)+int64(ti.Size()) > int64(len(data)) {
				t.Fatalf("tensor %q outside the file", ti.Name)
			}
		}
	})
}
