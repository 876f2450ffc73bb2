package model

import (
	"fmt"
	"math"
	"strings"
)

// plantEnds are the tokens a planted text starts after (-1: none) and
// ends with, in arch's generated vocabulary of vocab tokens: the
// SentencePiece vocabulary's BOS and EOS; Qwen's none and <|im_end|>;
// GLM's none and <|user|>.
func plantEnds(arch string, vocab int) (bos, eos int32) {
	switch arch {
	case "qwen3moe":
		return -1, int32(vocab - len(bpeControls[arch]) + 2)
	case "glm4moe":
		return -1, int32(vocab - len(bpeControls[arch]) + 4)
	case "gpt-oss":
		return -1, int32(vocab - len(bpeControls[arch]) + 2) // <|return|>
	case "deepseek2":
		first := int32(vocab - len(bpeControls[arch]))
		return first, first + 1 // <｜begin▁of▁sentence｜>, <｜end▁of▁sentence｜>
	}
	return 1, 2
}

// plant holds the weights of a model that speaks: greedy decoding of any
// prefix of its text (BOS first) continues the text and ends with EOS.
// Each of the text's tokens t (and BOS) gets its own pair of basis
// directions of the hidden state: a_t (its embedding) and b_t (its row of
// the output head). Attention adds nothing (its output projection is
// zero, as are dense layers and shared experts); every expert maps a_t
// to b_next(t) (a gate and an up unit per
// token that fire on a_t, a down column that writes b_next(t)), so the
// text comes through the experts' compute: an expert node that returned a
// wrong output would change it. The other tokens' output rows are zero.
type plant struct {
	embd, ff int
	oai      bool            // gpt-oss's experts: swiglu_oai and biases
	slot     map[int32]int   // token -> its pair of directions
	next     map[int32]int32 // token -> the token that follows it
}

// Plant scales: the gate's pre-activation on its own token (silu(4) ≈ 3.93)
// and what the first layer's experts add to the output direction.
const (
	plantGate = 4
	plantOut  = 2
)

func newPlant(arch string, p Params, text []int32) (*plant, error) {
	if len(text) == 0 {
		return nil, fmt.Errorf("planted text: no tokens")
	}
	pl := &plant{embd: p.Embd, ff: p.FF, oai: arch == "gpt-oss", slot: map[int32]int{}, next: map[int32]int32{}}
	bos, eos := plantEnds(arch, p.Vocab)
	seq := append(append([]int32{}, text...), eos)
	if bos >= 0 {
		seq = append([]int32{bos}, seq...)
	}
	for i, t := range seq {
		if t < 0 || int(t) >= p.Vocab {
			return nil, fmt.Errorf("planted text: token %d outside the vocabulary of %d", t, p.Vocab)
		}
		if _, ok := pl.slot[t]; !ok {
			pl.slot[t] = len(pl.slot)
		}
		if i == len(seq)-1 {
			break
		}
		if t == eos {
			return nil, fmt.Errorf("planted text: it holds the end-of-text token")
		}
		if n, ok := pl.next[t]; ok && n != seq[i+1] {
			return nil, fmt.Errorf("planted text: token %d is followed once by token %d and once by token %d: a planted model maps each token to one next token (change the text where it repeats)", t, n, seq[i+1])
		}
		pl.next[t] = seq[i+1]
	}
	if 2*len(pl.slot) > p.Embd {
		return nil, fmt.Errorf("planted text: %d distinct tokens need embd of at least %d (have %d; use --embd)", len(pl.slot), 2*len(pl.slot), p.Embd)
	}
	if len(pl.next) > p.FF {
		return nil, fmt.Errorf("planted text: %d distinct tokens need ff of at least %d (have %d; use --ff)", len(pl.next), len(pl.next), p.FF)
	}
	return pl, nil
}

// a and b are the directions of token t's slot.
func (pl *plant) a(t int32) int { return 2 * pl.slot[t] }
func (pl *plant) b(t int32) int { return 2*pl.slot[t] + 1 }

// tensor fills a planted tensor's values (f32, ggml order: ne0 fastest);
// false for a tensor the plant leaves random.
func (pl *plant) tensor(name string, x []float32, experts int) bool {
	e, f := pl.embd, pl.ff
	switch {
	case name == "token_embd.weight":
		// The text's tokens: a_t; the others keep their random rows.
		for t := range pl.slot {
			row := x[int(t)*e : int(t)*e+e]
			clear(row)
			row[pl.a(t)] = 1
		}
	case name == "output.weight":
		clear(x)
		for t := range pl.slot {
			x[int(t)*e+pl.b(t)] = 1
		}
	case strings.HasSuffix(name, "attn_output.weight"), strings.HasSuffix(name, "attn_output.bias"),
		strings.HasSuffix(name, "_exps.bias"), strings.HasSuffix(name, "_shexp.weight"),
		strings.HasSuffix(name, "ffn_gate.weight"), strings.HasSuffix(name, "ffn_up.weight"), strings.HasSuffix(name, "ffn_down.weight"):
		// Attention, GLM's dense leading layers and shared experts and
		// gpt-oss's biases add nothing: the signal is the routed experts'.
		clear(x)
	case strings.HasSuffix(name, "_norm.weight"):
		for i := range x {
			x[i] = 1
		}
	case strings.HasSuffix(name, "ffn_gate_exps.weight"), strings.HasSuffix(name, "ffn_up_exps.weight"):
		// Shape (e, f, experts): unit j of every expert reads a_t.
		clear(x)
		scale := float32(1)
		if strings.HasSuffix(name, "ffn_gate_exps.weight") {
			scale = plantGate / float32(math.Sqrt(float64(e)))
		}
		for ex := range experts {
			for t := range pl.next { // a token's unit is its slot
				x[ex*f*e+pl.slot[t]*e+pl.a(t)] = scale
			}
		}
	case strings.HasSuffix(name, "ffn_down_exps.weight"):
		// Shape (f, e, experts): unit j writes b_next(t). On the first
		// layer's input (a_t exactly, √embd after the norm) the unit's
		// activation is silu(plantGate)·√embd, or with gpt-oss's
		// swiglu_oai (gate clamped to 7, sigmoid of 1.702·gate, up
		// clamped to ±7, plus 1) plantGate·σ(1.702·plantGate)·(min(√embd, 7)+1).
		clear(x)
		act := float32(plantGate/(1+math.Exp(-plantGate))) * float32(math.Sqrt(float64(e)))
		if pl.oai {
			act = float32(plantGate/(1+math.Exp(-1.702*plantGate))) * float32(min(math.Sqrt(float64(e)), 7)+1)
		}
		for ex := range experts {
			for t, n := range pl.next {
				x[ex*e*f+pl.b(n)*f+pl.slot[t]] = plantOut / act
			}
		}
	default:
		return false
	}
	return true
}
