package sign

import (
	"bytes"
	"errors"
	"testing"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/neuropb"
)

func key(t testing.TB) (crypto.PrivKey, peer.ID) {
	t.Helper()
	k, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return k, id
}

// A signature made in one domain verifies in that domain only: it is
// refused in every other, for the same message and the same key.
func TestSignatureIsBoundToItsDomain(t *testing.T) {
	k, id := key(t)
	m := &neuropb.UsageReceipt{Escrow: 7, Layer: 1, ExpertIndex: 2, Tokens: 3}
	for _, signed := range Domains {
		sig, err := Sign(k, signed, m)
		if err != nil {
			t.Fatal(err)
		}
		for _, checked := range Domains {
			err := Verify(id, checked, m, sig)
			switch {
			case checked == signed && err != nil:
				t.Errorf("signed for %s, refused in its own domain: %v", signed, err)
			case checked != signed && !errors.Is(err, ErrBadSignature):
				t.Errorf("signed for %s, verified in %s: %v", signed, checked, err)
			}
		}
	}
}

// The message type is covered too: two messages of different types whose
// encodings are the same bytes do not share a signature.
func TestSignatureIsBoundToItsType(t *testing.T) {
	k, id := key(t)
	a, b := &neuropb.UsageReceipt{}, &neuropb.Verdict{}
	sig, err := Sign(k, Verdict, a)
	if err != nil {
		t.Fatal(err)
	}
	if err := Verify(id, Verdict, b, sig); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("a %T signature verified for a %T: %v", a, b, err)
	}
	ba, _ := Bytes(Verdict, a)
	bb, _ := Bytes(Verdict, b)
	if bytes.Equal(ba, bb) {
		t.Fatal("the signed bytes do not name the type")
	}
}

// A changed message, another signer or a plain signature over the payload
// alone (the format before domains) is refused.
func TestVerifyRefuses(t *testing.T) {
	k, id := key(t)
	_, other := key(t)
	m := &neuropb.UsageReceipt{Escrow: 7}
	sig, err := Sign(k, UsageReceipt, m)
	if err != nil {
		t.Fatal(err)
	}
	if err := Verify(other, UsageReceipt, m, sig); !errors.Is(err, ErrBadSignature) {
		t.Errorf("another signer: %v", err)
	}
	if err := Verify(id, UsageReceipt, &neuropb.UsageReceipt{Escrow: 8}, sig); !errors.Is(err, ErrBadSignature) {
		t.Errorf("changed message: %v", err)
	}
	payload, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := k.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	if err := Verify(id, UsageReceipt, m, plain); !errors.Is(err, ErrBadSignature) {
		t.Errorf("a signature over the bare payload: %v", err)
	}
	if _, err := Bytes("", m); err == nil {
		t.Error("an empty domain was accepted")
	}
}

// A good signature is verified once: verifying it again (a batch's
// receipts share one; a ledger checks a receipt in CheckTx and again in
// its block) costs no Ed25519 verification. A bad one is verified, and
// refused, every time; the remembered one verifies for its signer, message
// and domain only.
func TestVerifyRemembersGoodSignaturesOnly(t *testing.T) {
	k, id := key(t)
	_, other := key(t)
	m := &neuropb.ReceiptBatch{Digests: [][]byte{[]byte("a digest"), []byte("another")}}
	sig, err := Sign(k, UsageReceiptBatch, m)
	if err != nil {
		t.Fatal(err)
	}
	before := verifications.Load()
	for range 3 {
		if err := Verify(id, UsageReceiptBatch, m, sig); err != nil {
			t.Fatal(err)
		}
	}
	if n := verifications.Load() - before; n != 1 {
		t.Fatalf("a good signature verified thrice took %d Ed25519 verifications, want 1", n)
	}
	bad := bytes.Clone(sig)
	bad[0] ^= 1
	changed := &neuropb.ReceiptBatch{Digests: [][]byte{[]byte("a digest")}}
	for range 2 {
		before = verifications.Load()
		for name, err := range map[string]error{
			"a changed signature": Verify(id, UsageReceiptBatch, m, bad),
			"another signer":      Verify(other, UsageReceiptBatch, m, sig),
			"a changed message":   Verify(id, UsageReceiptBatch, changed, sig),
			"another domain":      Verify(id, UsageReceipt, m, sig),
		} {
			if !errors.Is(err, ErrBadSignature) {
				t.Errorf("%s verified beside the remembered signature: %v", name, err)
			}
		}
		if n := verifications.Load() - before; n != 4 {
			t.Errorf("four bad signatures took %d Ed25519 verifications, want 4 (a refusal is not remembered)", n)
		}
	}
}

// BenchmarkVerify: a signature seen first, against one verified before.
func BenchmarkVerify(b *testing.B) {
	k, id := key(b)
	m := &neuropb.ReceiptBatch{Digests: [][]byte{make([]byte, 32), make([]byte, 32)}}
	b.Run("first", func(b *testing.B) {
		b.StopTimer()
		for i := range b.N {
			m.Digests[0][0], m.Digests[0][1] = byte(i), byte(i>>8)
			sig, _ := Sign(k, UsageReceiptBatch, m)
			b.StartTimer()
			if err := Verify(id, UsageReceiptBatch, m, sig); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
		}
	})
	sig, err := Sign(k, UsageReceiptBatch, m)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("again", func(b *testing.B) {
		for range b.N {
			if err := Verify(id, UsageReceiptBatch, m, sig); err != nil {
				b.Fatal(err)
			}
		}
	})
}
