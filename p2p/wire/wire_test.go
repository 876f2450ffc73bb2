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

// FuzzExpertRequest feeds random frames to the reader and the request
// validator: neither may panic.
func FuzzExpertRequest(f *testing.F) {
	var buf bytes.Buffer
	NewWriter(&buf, 1<<20).Write(&neuropb.ExpertRequest{RequestId: 9, Model: []byte{1, 85, 18, 32}, Hidden: &neuropb.Tensor{
		Data: make([]byte, 16), Dtype: neuropb.WireDType_WIRE_DTYPE_F16, Shape: []uint32{2, 4}}})
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
			_ = m.Validate()
		}
	})
}
