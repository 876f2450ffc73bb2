package reputation

import (
	"bytes"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/neuropb"
)

func receipts(n int) []*neuropb.UsageReceipt {
	rs := make([]*neuropb.UsageReceipt, n)
	for i := range rs {
		rs[i] = &neuropb.UsageReceipt{Escrow: 7, Layer: 3, ExpertIndex: uint32(i), Tokens: 1, Flops: 1000 + uint64(i),
			InputDigest: bytes.Repeat([]byte{byte(i)}, 32), OutputDigest: bytes.Repeat([]byte{byte(i + 100)}, 32)}
	}
	return rs
}

// An answer's receipts are signed at once, in batches of at most
// MaxReceiptBatch: each verifies alone, as its signer's, and none can be
// altered, moved to another batch or given another batch.
func TestSignReceiptsInBatches(t *testing.T) {
	key, id := newPeer(t)
	n := neuropb.MaxReceiptBatch + 4
	rs := receipts(n)
	if err := SignReceipts(key, rs); err != nil {
		t.Fatal(err)
	}
	for i, r := range rs {
		signer, err := VerifyReceipt(r)
		if err != nil || signer != id {
			t.Fatalf("receipt %d: signer %s, %v", i, signer, err)
		}
		want := neuropb.MaxReceiptBatch
		if i >= neuropb.MaxReceiptBatch {
			want = 4
		}
		if len(r.GetBatch()) != want {
			t.Fatalf("receipt %d in a batch of %d, want %d", i, len(r.GetBatch()), want)
		}
		// a proto round trip keeps it valid
		b, _ := proto.Marshal(r)
		var back neuropb.UsageReceipt
		if err := proto.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		if _, err := VerifyReceipt(&back); err != nil {
			t.Fatalf("receipt %d after encoding: %v", i, err)
		}
	}
	// one signature a batch
	if !bytes.Equal(rs[0].GetSignature(), rs[neuropb.MaxReceiptBatch-1].GetSignature()) ||
		bytes.Equal(rs[0].GetSignature(), rs[n-1].GetSignature()) {
		t.Fatal("want one signature for each batch, another for the next")
	}
	for _, tc := range []struct {
		name  string
		alter func(r *neuropb.UsageReceipt)
		want  string
	}{
		{"more FLOPs", func(r *neuropb.UsageReceipt) { r.Flops *= 2 }, "not in its batch"},
		{"another output", func(r *neuropb.UsageReceipt) { r.OutputDigest = bytes.Repeat([]byte{9}, 32) }, "not in its batch"},
		{"another batch's", func(r *neuropb.UsageReceipt) { r.Batch, r.Signature = rs[n-1].Batch, rs[n-1].Signature }, "not in its batch"},
		{"a digest of the batch changed", func(r *neuropb.UsageReceipt) {
			r.Batch = append([][]byte{}, r.Batch...)
			r.Batch[1] = bytes.Repeat([]byte{1}, 32)
		}, "receipt batch"},
		{"another signer named", func(r *neuropb.UsageReceipt) { _, other := newPeer(t); r.Expert = []byte(other) }, "not in its batch"},
		{"a batch too long", func(r *neuropb.UsageReceipt) {
			for len(r.Batch) <= neuropb.MaxReceiptBatch {
				r.Batch = append(r.Batch, r.Batch[0])
			}
		}, "at most"},
	} {
		r := proto.Clone(rs[0]).(*neuropb.UsageReceipt)
		tc.alter(r)
		if _, err := VerifyReceipt(r); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", tc.name, err, tc.want)
		}
	}
	// A batch signature does not verify as a lone receipt's, nor a lone
	// receipt's as a batch's.
	lone := proto.Clone(rs[0]).(*neuropb.UsageReceipt)
	lone.Batch = nil
	if _, err := VerifyReceipt(lone); err == nil {
		t.Fatal("a batch's signature verified for the receipt alone")
	}
	one := receipts(1)
	if err := SignReceipts(key, one); err != nil {
		t.Fatal(err)
	}
	if len(one[0].GetBatch()) != 0 {
		t.Fatal("a lone receipt signed as a batch")
	}
	if _, err := VerifyReceipt(one[0]); err != nil {
		t.Fatal(err)
	}
	one[0].Batch = [][]byte{must(ReceiptDigest(one[0]))}
	if _, err := VerifyReceipt(one[0]); err == nil {
		t.Fatal("a lone receipt's signature verified as a batch's")
	}
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}
