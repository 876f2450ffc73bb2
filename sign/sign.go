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
	"encoding/binary"
	"errors"
	"fmt"

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
// field cleared) for domain d.
func Verify(signer peer.ID, d Domain, m proto.Message, sig []byte) error {
	pub, err := signer.ExtractPublicKey()
	if err != nil {
		return fmt.Errorf("signer %s: key: %w", signer, err)
	}
	msg, err := Bytes(d, m)
	if err != nil {
		return err
	}
	if ok, err := pub.Verify(msg, sig); err != nil || !ok {
		return fmt.Errorf("%w of %s for %s", ErrBadSignature, signer, d)
	}
	return nil
}
