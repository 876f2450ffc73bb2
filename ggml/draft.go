package ggml

/*
#include "llama.h"
*/
import "C"

import (
	"fmt"

	"github.com/neuro-p2p/neuro/moe"
)

// Rewind forgets the tokens after the first pos: the next Decode continues
// at position pos.
func (c *LlamaContext) Rewind(pos int) error {
	if pos < 0 || pos > c.nPos {
		return fmt.Errorf("rewind to %d: the context holds %d tokens", pos, c.nPos)
	}
	if pos == c.nPos {
		return nil
	}
	unlock := c.l.gpuLock()
	ok := C.llama_memory_seq_rm(C.llama_get_memory(c.c), 0, C.llama_pos(pos), -1)
	unlock()
	if !ok {
		return fmt.Errorf("rewind to %d of %d tokens: llama.cpp cannot remove them (a sliding-window cache)", pos, c.nPos)
	}
	c.nPos = pos
	return nil
}

// DraftModel is a small model of a served model's vocabulary that drafts
// tokens for speculative decoding: its greedy continuation of the text so
// far, computed whole on this machine by llama.cpp (for example a smaller
// quantization of the same model).
type DraftModel struct {
	l       *Llama
	threads int
}

var _ moe.DraftModel = (*DraftModel)(nil)

// LoadDraft loads the draft model at path (a GGUF file) on dev.
func LoadDraft(dev Device, path string, threads int) (*DraftModel, error) {
	l, err := LoadLlamaOn(dev, path)
	if err != nil {
		return nil, fmt.Errorf("draft model: %w", err)
	}
	return &DraftModel{l: l, threads: threads}, nil
}

// LoadDraft implements moe.DraftLoader.
func (b Backend) LoadDraft(path string, threads int) (moe.DraftModel, error) {
	return LoadDraft(b.Device, path, threads)
}

// Vocab is the number of tokens in the draft model's vocabulary.
func (m *DraftModel) Vocab() int { return m.l.NVocab() }

// NewDrafter makes a drafter with a context of nCtx tokens.
func (m *DraftModel) NewDrafter(nCtx int) (moe.Drafter, error) {
	c, err := m.l.NewContext(ContextOptions{Context: nCtx, Threads: m.threads})
	if err != nil {
		return nil, fmt.Errorf("draft model: %w", err)
	}
	return &drafter{l: m.l, c: c}, nil
}

// Close frees the model.
func (m *DraftModel) Close() error { return m.l.Close() }

// drafter is one generation's draft context: it keeps the tokens it has
// decoded, so that each draft decodes only what is new.
type drafter struct {
	l   *Llama
	c   *LlamaContext
	seq []int32 // the tokens in c
}

// Draft returns up to k tokens of the draft model's greedy continuation
// of seq (fewer when it would end the text).
func (d *drafter) Draft(seq []int32, k int) ([]int32, error) {
	if len(seq) == 0 || k <= 0 {
		return nil, nil
	}
	// Keep what the context holds of seq; the last token is decoded
	// anew for its logits.
	p := 0
	for p < len(d.seq) && p < len(seq)-1 && d.seq[p] == seq[p] {
		p++
	}
	if err := d.c.Rewind(p); err != nil {
		if err := d.c.Rewind(0); err != nil {
			return nil, err
		}
		p = 0
	}
	d.seq = append(d.seq[:p], seq[p:]...)
	room := d.c.nCtx - len(seq)
	k = min(k, room)
	if k <= 0 {
		return nil, nil
	}
	if err := d.c.Decode(seq[p:]); err != nil {
		d.seq = d.seq[:p]
		return nil, err
	}
	var draft []int32
	for len(draft) < k {
		tok := moe.Argmax(d.c.Logits())
		if d.l.IsEOG(tok) {
			break
		}
		draft = append(draft, tok)
		if len(draft) == k {
			break
		}
		if err := d.c.Decode([]int32{tok}); err != nil {
			return draft, nil
		}
		d.seq = append(d.seq, tok)
	}
	return draft, nil
}

// Close gives the context back.
func (d *drafter) Close() error { return d.c.Close() }
