package wire

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/neuro-p2p/neuro/neuropb"
)

func TestRoundTripAndSkip(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf, 1<<20)
	small := &neuropb.ExpertRequest{RequestId: 1, Layer: 2}
	big := &neuropb.ExpertRequest{RequestId: 2, Hidden: &neuropb.Tensor{Data: make([]byte, 5000)}}
	last := &neuropb.ExpertRequest{RequestId: 3, Expert: 7}
	for _, m := range []*neuropb.ExpertRequest{small, big, last} {
		if err := w.Write(m); err != nil {
			t.Fatal(err)
		}
	}
	r := NewReader(&buf, 1000)
	var got neuropb.ExpertRequest
	if err := r.Read(&got); err != nil || got.GetRequestId() != 1 || got.GetLayer() != 2 {
		t.Fatalf("first: %v %v", &got, err)
	}
	var tl *TooLargeError
	if err := r.Read(&got); !errors.As(err, &tl) || !tl.Skipped || tl.Size < 5000 {
		t.Fatalf("oversized: %v", err)
	}
	if err := r.Read(&got); err != nil || got.GetRequestId() != 3 || got.GetExpert() != 7 {
		t.Fatalf("after the skipped message: %v %v", &got, err)
	}
	if err := r.Read(&got); !errors.Is(err, io.EOF) {
		t.Fatalf("at the end: %v", err)
	}
	if err := NewWriter(io.Discard, 10).Write(big); !errors.As(err, &tl) {
		t.Fatalf("writing over the limit: %v", err)
	}
}

func TestGarbageEndsTheStream(t *testing.T) {
	// A length that claims more than MaxSkip, then garbage.
	r := NewReader(bytes.NewReader([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 1, 2, 3}), 100)
	var m neuropb.ExpertRequest
	var tl *TooLargeError
	if err := r.Read(&m); !errors.As(err, &tl) || tl.Skipped {
		t.Fatalf("huge frame: %v", err)
	}
	r = NewReader(bytes.NewReader([]byte{3, 0xff, 0xff, 0xff}), 100)
	if err := r.Read(&m); err == nil {
		t.Fatal("parsed garbage")
	}
}

// FuzzExpertRequest feeds random frames to the reader, the expansion of a
// group's shared rows and the request validator, as an expert node does:
// none may panic.
func FuzzExpertRequest(f *testing.F) {
	var buf bytes.Buffer
	NewWriter(&buf, 1<<20).Write(&neuropb.ExpertRequest{RequestId: 9, Model: []byte{1, 85, 18, 32}, Hidden: &neuropb.Tensor{
		Data: make([]byte, 16), Dtype: neuropb.WireDType_WIRE_DTYPE_F16, Shape: []uint32{2, 4}}})
	f.Add(buf.Bytes())
	buf.Reset()
	NewWriter(&buf, 1<<20).Write(&neuropb.ExpertRequest{RequestId: 9, Model: []byte{1, 85, 18, 32}, RowIndex: []uint32{0, 1},
		GroupRows: &neuropb.Tensor{Data: make([]byte, 16), Dtype: neuropb.WireDType_WIRE_DTYPE_F16, Shape: []uint32{2, 4}},
		Group:     []*neuropb.ExpertRequest{{RequestId: 10, Model: []byte{1, 85, 18, 32}, Expert: 1, RowIndex: []uint32{1}}}})
	f.Add(buf.Bytes())
	f.Add([]byte{0})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewReader(bytes.NewReader(data), 4096)
		for range 4 {
			var m neuropb.ExpertRequest
			if err := r.Read(&m); err != nil {
				var tl *TooLargeError
				if errors.As(err, &tl) && tl.Skipped {
					continue
				}
				return
			}
			if m.UnshareRows() == nil {
				_ = m.Validate()
			}
		}
	})
}

// countWriter counts the writes it is given.
type countWriter struct {
	bytes.Buffer
	writes int
}

func (c *countWriter) Write(p []byte) (int, error) {
	c.writes++
	return c.Buffer.Write(p)
}

// Each message goes to the stream in one write (one frame of the stream
// below, one system call), from a buffer the Writer keeps unless a
// message was over keepBuf.
func TestOneWritePerMessage(t *testing.T) {
	var cw countWriter
	w := NewWriter(&cw, 4<<20)
	msgs := []*neuropb.ExpertRequest{
		{RequestId: 1},
		{RequestId: 2, Hidden: &neuropb.Tensor{Data: make([]byte, 200<<10)}}, // over bufio's 64 KB
		{RequestId: 3, Hidden: &neuropb.Tensor{Data: make([]byte, 2<<20)}},   // over keepBuf
		{RequestId: 4, Layer: 9},
	}
	for i, m := range msgs {
		if err := w.Write(m); err != nil {
			t.Fatal(err)
		}
		if cw.writes != i+1 {
			t.Fatalf("message %d: %d writes in all, want %d", i, cw.writes, i+1)
		}
		if i == 2 && w.buf != nil {
			t.Fatalf("kept a buffer of %d bytes after a message over keepBuf", cap(w.buf))
		}
	}
	r := NewReader(&cw, 4<<20)
	for _, want := range msgs {
		var got neuropb.ExpertRequest
		if err := r.Read(&got); err != nil || got.GetRequestId() != want.GetRequestId() || len(got.GetHidden().GetData()) != len(want.GetHidden().GetData()) ||
			got.GetLayer() != want.GetLayer() {
			t.Fatalf("read back %d: %v", want.GetRequestId(), err)
		}
	}
}

// BenchmarkWriter: framing an expert answer of one token (hidden 4096 in
// F16), its allocations included.
func BenchmarkWriter(b *testing.B) {
	w := NewWriter(io.Discard, 1<<20)
	m := &neuropb.ExpertResponse{RequestId: 1, Output: &neuropb.Tensor{Data: make([]byte, 8192), Shape: []uint32{1, 4096}}}
	b.ReportAllocs()
	for range b.N {
		if err := w.Write(m); err != nil {
			b.Fatal(err)
		}
	}
}
