package neuropb

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"
)

// GatingKey is the DHT key under which the gating nodes of a model
// provide themselves: the CID (raw, sha2-256) of "/neuro/gating/" and the
// model's CID. Clients find gating nodes with FindProviders(GatingKey(m)).
func GatingKey(model cid.Cid) cid.Cid {
	h, err := multihash.Sum([]byte("/neuro/gating/"+model.String()), multihash.SHA2_256, -1)
	if err != nil {
		// sha2-256 is always registered; this cannot happen.
		panic(fmt.Sprintf("gating key: %v", err))
	}
	return cid.NewCidV1(cid.Raw, h)
}

// ExpertKey is the DHT key under which the nodes serving expert (layer,
// expert) of a model provide themselves (a shard's CID says who stores
// the weights; this says who computes with them).
func ExpertKey(model cid.Cid, layer, expert int) cid.Cid {
	h, err := multihash.Sum([]byte(fmt.Sprintf("/neuro/expert/%s/%d/%d", model, layer, expert)), multihash.SHA2_256, -1)
	if err != nil {
		panic(fmt.Sprintf("expert key: %v", err))
	}
	return cid.NewCidV1(cid.Raw, h)
}

// EscrowID is the ID of the escrow that the ledger transaction of sender
// (a peer ID's bytes) with nonce opens: known as soon as the transaction
// is signed, so that a client can name it in its requests before the
// block that applies it.
func EscrowID(sender []byte, nonce uint64) uint64 {
	h := sha256.New()
	h.Write(sender)
	var n [8]byte
	binary.LittleEndian.PutUint64(n[:], nonce)
	h.Write(n[:])
	id := binary.BigEndian.Uint64(h.Sum(nil))
	return max(id, 1) // 0 means no escrow
}

// SpanKey is the DHT key under which the nodes that serve layers
// [first, end) of a model as a span provide themselves, so that a head
// finds more providers of a span it has heard of than heartbeats tell.
func SpanKey(model cid.Cid, first, end int) cid.Cid {
	h, err := multihash.Sum([]byte(fmt.Sprintf("/neuro/span/%s/%d/%d", model, first, end)), multihash.SHA2_256, -1)
	if err != nil {
		panic(fmt.Sprintf("span key: %v", err))
	}
	return cid.NewCidV1(cid.Raw, h)
}
