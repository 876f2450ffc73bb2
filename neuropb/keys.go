package neuropb

import (
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
