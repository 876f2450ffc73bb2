package expert

import (
	"errors"
	"fmt"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/sign"
)

// SignDelegation lets delegate pay its expert calls from escrow, which
// the key's node opened as gating node, until expires
// (neuropb.EscrowDelegation).
func SignDelegation(key crypto.PrivKey, escrow uint64, delegate peer.ID, expires time.Time) (*neuropb.EscrowDelegation, error) {
	signer, err := peer.IDFromPrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("delegation: %w", err)
	}
	d := &neuropb.EscrowDelegation{Escrow: escrow, Delegate: []byte(delegate), ExpiresUnixMs: expires.UnixMilli(), Signer: []byte(signer)}
	if d.Signature, err = sign.Sign(key, sign.EscrowDelegation, d); err != nil {
		return nil, fmt.Errorf("delegation: %w", err)
	}
	return d, nil
}

// VerifyDelegation checks that d lets caller spend from escrow at now,
// and returns the node it speaks for (its signer, whom the escrow must
// name as its gating node).
func VerifyDelegation(d *neuropb.EscrowDelegation, caller peer.ID, escrow uint64, now time.Time) (peer.ID, error) {
	if d.GetEscrow() != escrow {
		return "", fmt.Errorf("delegation of escrow %d, not %d", d.GetEscrow(), escrow)
	}
	if peer.ID(d.GetDelegate()) != caller {
		return "", errors.New("delegation to another node than the caller")
	}
	if now.After(time.UnixMilli(d.GetExpiresUnixMs())) {
		return "", errors.New("delegation expired")
	}
	signer, err := peer.IDFromBytes(d.GetSigner())
	if err != nil {
		return "", fmt.Errorf("delegation signer: %w", err)
	}
	unsigned := proto.Clone(d).(*neuropb.EscrowDelegation)
	unsigned.Signature = nil
	if err := sign.Verify(signer, sign.EscrowDelegation, unsigned, d.GetSignature()); err != nil {
		return "", fmt.Errorf("delegation: %w", err)
	}
	return signer, nil
}

// delegationFor finds among ds the delegation of escrow.
func delegationFor(ds []*neuropb.EscrowDelegation, escrow uint64) *neuropb.EscrowDelegation {
	for _, d := range ds {
		if d.GetEscrow() == escrow {
			return d
		}
	}
	return nil
}
