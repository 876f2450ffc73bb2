// Package sign is the one place where neuro signs and verifies its own
// messages with a peer's key. A signature covers
//
//	domain ‖ type ‖ payload
//
// each length-prefixed (unsigned varints): the domain says what the
// signature is for (a usage receipt, a verdict, a ledger transaction), the
// type is the protobuf message's full name, and the payload is the
// message's deterministic protobuf encoding without its signature. So a
// signature made for one purpose is refused for every other, even where
// two messages' bytes happen to agree (go-libp2p's core/record envelope
// does the same for signed records).
//
// Heartbeats and other GossipSub messages are signed by GossipSub itself,
// under its own "libp2p-pubsub:" prefix.
package sign

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"
)

// Domain names what a signature is for.
type Domain string

// The domains of neuro's signed messages. Each is used for one message
// kind only.
const (
	// UsageReceipt: an expert node's receipt for one computed answer.
	UsageReceipt Domain = "neuro/usage-receipt/v1"
	// Verdict: a judge's statement that a peer's result was wrong.
	Verdict Domain = "neuro/verdict/v1"
	// LedgerTx: a ledger transaction, signed by its sender.
	LedgerTx Domain = "neuro/ledger-tx/v1"
	// EscrowDelegation: a gating node's leave for another node to pay its
	// expert calls from the gating node's escrow.
	EscrowDelegation Domain = "neuro/escrow-delegation/v1"
	// UsageReceiptBatch: an expert node's receipts for one answer, signed
	// at once (a neuropb.ReceiptBatch of their digests).
	UsageReceiptBatch Domain = "neuro/usage-receipt-batch/v1"
	// ReceiptDigest: not a signature's domain but the hash of one receipt
	// in a batch (neuropb.UsageReceipt.batch).
	ReceiptDigest Domain = "neuro/receipt-digest/v1"
)

// Domains lists every domain (for tests and documentation).
var Domains = []Domain{UsageReceipt, Verdict, LedgerTx, EscrowDelegation, UsageReceiptBatch, ReceiptDigest}

// ErrBadSignature means a signature does not verify.
var ErrBadSignature = errors.New("bad signature")

// Bytes returns what a signature covers: domain ‖ type ‖ payload, where
// payload is m's deterministic encoding. m must have its signature field
// cleared.
func Bytes(d Domain, m proto.Message) ([]byte, error) {
	if d == "" {
		return nil, errors.New("sign: empty domain")
	}
	payload, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("sign: encode %s: %w", proto.MessageName(m), err)
	}
	typ := string(proto.MessageName(m))
	out := make([]byte, 0, 3*binary.MaxVarintLen64+len(d)+len(typ)+len(payload))
	for _, part := range [][]byte{[]byte(d), []byte(typ), payload} {
		out = binary.AppendUvarint(out, uint64(len(part)))
		out = append(out, part...)
	}
	return out, nil
}

// Sign signs m (with its signature field cleared) for domain d.
func Sign(key crypto.PrivKey, d Domain, m proto.Message) ([]byte, error) {
	msg, err := Bytes(d, m)
	if err != nil {
		return nil, err
	}
	sig, err := key.Sign(msg)
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", d, err)
	}
	return sig, nil
}

// Verify checks that sig is signer's signature of m (with its signature
// field cleared) for domain d. A signature it found good before is not
// verified again (see verified).
func Verify(signer peer.ID, d Domain, m proto.Message, sig []byte) error {
	msg, err := Bytes(d, m)
	if err != nil {
		return err
	}
	seen := verifiedKey(signer, msg, sig)
	if verified.Contains(seen) {
		return nil
	}
	pub, err := signer.ExtractPublicKey()
	if err != nil {
		return fmt.Errorf("signer %s: key: %w", signer, err)
	}
	verifications.Add(1)
	if ok, err := pub.Verify(msg, sig); err != nil || !ok {
		return fmt.Errorf("%w of %s for %s", ErrBadSignature, signer, d)
	}
	verified.Add(seen, struct{}{})
	return nil
}

// verifiedSize bounds the signatures verified remembers: a generation's
// receipts are one signature a layer's answer (a few thousand a long
// generation), checked again within seconds.
const verifiedSize = 1 << 15

// verified remembers, by verifiedKey, the signatures Verify found good, the
// most recent verifiedSize of them. The same signature comes back to the
// same process: the receipts of one answer share one, and a receipt is
// checked by the gating node that settles it, then by a validator's
// CheckTx and again as its block is finalized (all three in one process
// where the gating node is a validator) — an Ed25519 verification each
// (65 µs on a 2-core VM), where a hash of the same bytes is 1–2 µs. Only
// good signatures are kept, under a collision-resistant hash of the signer,
// the signed bytes (domain and type included) and the signature, so the
// answer is always the one verifying again gives: the ledger's state
// machine stays deterministic.
var verified = func() *lru.Cache[[sha256.Size]byte, struct{}] {
	c, err := lru.New[[sha256.Size]byte, struct{}](verifiedSize)
	if err != nil {
		panic(err) // only for a size below 1
	}
	return c
}()

// verifications counts the Ed25519 verifications Verify made (for tests).
var verifications atomic.Int64

// verifiedKey is verified's key for signer's sig over msg: SHA-256 of the
// three, each length-prefixed.
func verifiedKey(signer peer.ID, msg, sig []byte) [sha256.Size]byte {
	h := sha256.New()
	var n [binary.MaxVarintLen64]byte
	for _, part := range [][]byte{[]byte(signer), msg, sig} {
		h.Write(n[:binary.PutUvarint(n[:], uint64(len(part)))])
		h.Write(part)
	}
	var k [sha256.Size]byte
	h.Sum(k[:0])
	return k
}
