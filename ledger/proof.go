package ledger

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"

	cmtproto "github.com/cometbft/cometbft/api/cometbft/types/v1"
	"github.com/cometbft/cometbft/crypto/merkle"
	"github.com/cometbft/cometbft/crypto/tmhash"
	cmttypes "github.com/cometbft/cometbft/types"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/neuropb"
)

// The app hash is the Merkle root (CometBFT's crypto/merkle) of the
// state's leaves in key order: one per account, keyed accountPrefix + peer
// ID, then the global leaf (everything else), keyed globalKey. A leaf's
// bytes are its key, a zero byte and its value (JSON), so a proof shows
// both; keys hold no zero byte.
const (
	accountPrefix = "a/"
	globalKey     = "g"
)

// globalLeaf is the global leaf's value: the state without its accounts,
// and what the accounts hold in all (for the supply invariant).
type globalLeaf struct {
	State
	Held uint64 `json:"held"`
}

func leafBytes(key string, value []byte) []byte {
	b := make([]byte, 0, len(key)+1+len(value))
	b = append(b, key...)
	b = append(b, 0)
	return append(b, value...)
}

// leaves returns the state's leaf keys and bytes, in order.
func (s *State) leaves() (keys []string, items [][]byte) {
	ids := sortedKeys(s.Accounts)
	keys = make([]string, 0, len(ids)+1)
	items = make([][]byte, 0, len(ids)+1)
	for _, id := range ids {
		v, err := json.Marshal(s.Accounts[id])
		if err != nil {
			panic(fmt.Sprintf("ledger: encode account: %v", err)) // plain values
		}
		keys = append(keys, accountPrefix+id)
		items = append(items, leafBytes(accountPrefix+id, v))
	}
	g := globalLeaf{State: *s, Held: s.Held()}
	g.Accounts = nil
	v, err := json.Marshal(g)
	if err != nil {
		panic(fmt.Sprintf("ledger: encode state: %v", err))
	}
	keys = append(keys, globalKey)
	items = append(items, leafBytes(globalKey, v))
	return keys, items
}

// Hash is the app hash: the Merkle root of the state's leaves.
func (s *State) Hash() []byte {
	_, items := s.leaves()
	return merkle.HashFromByteSlices(items)
}

// prove builds the Merkle part of a proof of p's account (or of its
// absence), the global leaf and, with voters, the accounts that voted on
// open proposals.
func (s *State) prove(p peer.ID) *neuropb.LedgerProof {
	keys, items := s.leaves()
	_, proofs := merkle.ProofsFromByteSlices(items)
	leaf := func(i int) *neuropb.MerkleLeaf {
		k := keys[i]
		return &neuropb.MerkleLeaf{Key: k, Value: items[i][len(k)+1:], Total: proofs[i].Total, Index: proofs[i].Index, Aunts: proofs[i].Aunts}
	}
	out := &neuropb.LedgerProof{Height: s.Height, Global: leaf(len(keys) - 1)}
	want := accountPrefix + p.String()
	i := sort.SearchStrings(keys[:len(keys)-1], want)
	if i < len(keys)-1 && keys[i] == want {
		out.Accounts = []*neuropb.MerkleLeaf{leaf(i)}
	} else {
		if i > 0 {
			out.Accounts = append(out.Accounts, leaf(i-1))
		}
		out.Accounts = append(out.Accounts, leaf(i)) // the next account, or the global leaf
	}
	seen := map[string]bool{}
	for _, id := range sortedKeys(s.Proposals) {
		if pr := s.Proposals[id]; !pr.Done {
			for _, v := range sortedKeys(pr.Votes) {
				if j := sort.SearchStrings(keys[:len(keys)-1], accountPrefix+v); !seen[v] && j < len(keys)-1 && keys[j] == accountPrefix+v {
					seen[v] = true
					out.Voters = append(out.Voters, leaf(j))
				}
			}
		}
	}
	return out
}

// verifyLeaf checks a leaf's proof against the app hash.
func verifyLeaf(appHash []byte, l *neuropb.MerkleLeaf) error {
	if strings.IndexByte(l.GetKey(), 0) >= 0 {
		return errors.New("leaf key holds a zero byte")
	}
	item := leafBytes(l.GetKey(), l.GetValue())
	// RFC 6962: a leaf's hash is SHA-256 of a zero byte and the leaf.
	pr := &merkle.Proof{Total: l.GetTotal(), Index: l.GetIndex(), LeafHash: tmhash.Sum(append([]byte{0}, item...)), Aunts: l.GetAunts()}
	if err := pr.Verify(appHash, item); err != nil {
		return fmt.Errorf("leaf %q: %w", l.GetKey(), err)
	}
	return nil
}

// VerifyStatus checks a validator's answer for p's account against the
// chain: the header's commit must be signed by more than two thirds of the
// genesis validators' power, its app hash must be the root of the proven
// leaves, and the leaves must show p's account or its absence. It returns
// the status rebuilt from the proven leaves alone.
func VerifyStatus(g ChainGenesis, p peer.ID, st *neuropb.LedgerStatus) (*neuropb.LedgerStatus, error) {
	pf := st.GetProof()
	if pf == nil || pf.GetGlobal() == nil {
		return nil, errors.New("ledger status: no proof")
	}
	appHash, err := verifyHeader(g, pf)
	if err != nil {
		return nil, fmt.Errorf("ledger status: %w", err)
	}
	if err := verifyLeaf(appHash, pf.GetGlobal()); err != nil {
		return nil, fmt.Errorf("ledger status: %w", err)
	}
	gl := pf.GetGlobal()
	if gl.GetKey() != globalKey || gl.GetIndex() != gl.GetTotal()-1 {
		return nil, errors.New("ledger status: the global leaf is not the last")
	}
	state, held, err := globalState(gl.GetValue())
	if err != nil {
		return nil, fmt.Errorf("ledger status: %w", err)
	}
	if state.Height != pf.GetHeight() {
		return nil, fmt.Errorf("ledger status: the proof is of height %d, its state of %d", pf.GetHeight(), state.Height)
	}
	// The account: its leaf, or the neighbours that leave no room for it.
	want := accountPrefix + p.String()
	accs := pf.GetAccounts()
	for i, l := range append(append([]*neuropb.MerkleLeaf{}, accs...), pf.GetVoters()...) {
		if err := verifyLeaf(appHash, l); err != nil {
			return nil, fmt.Errorf("ledger status: %w", err)
		}
		if l.GetTotal() != gl.GetTotal() {
			return nil, errors.New("ledger status: leaves of different trees")
		}
		id, ok := strings.CutPrefix(l.GetKey(), accountPrefix)
		if !ok || (i < len(accs) && l.GetKey() != want) {
			continue // a neighbour or the global leaf
		}
		a := &Account{}
		if err := json.Unmarshal(l.GetValue(), a); err != nil {
			return nil, fmt.Errorf("ledger status: account %s: %w", id, err)
		}
		state.Accounts[id] = a
	}
	switch {
	case len(accs) == 1 && accs[0].GetKey() == want:
	case len(accs) == 1 && accs[0].GetIndex() == 0 && accs[0].GetKey() > want:
	case len(accs) == 2 && accs[1].GetIndex() == accs[0].GetIndex()+1 && accs[0].GetKey() < want && want < accs[1].GetKey():
	default:
		return nil, fmt.Errorf("ledger status: no proof of account %s", p)
	}
	out := statusOf(state, held, g.ChainID, p)
	out.AppHash = appHash
	out.Proof = pf
	return out, nil
}

// globalState reads the global leaf's value: the state without its
// accounts, and what the accounts hold in all.
func globalState(value []byte) (*State, uint64, error) {
	var glob globalLeaf
	if err := json.Unmarshal(value, &glob); err != nil {
		return nil, 0, fmt.Errorf("global leaf: %w", err)
	}
	state, err := LoadState(mustJSON(glob.State))
	if err != nil {
		return nil, 0, fmt.Errorf("global leaf: %w", err)
	}
	return state, glob.Held, nil
}

// verifyHeader checks the proof's header and commit against the genesis
// validators and returns the header's app hash.
func verifyHeader(g ChainGenesis, pf *neuropb.LedgerProof) ([]byte, error) {
	var ph cmtproto.Header
	if err := ph.Unmarshal(pf.GetHeader()); err != nil {
		return nil, fmt.Errorf("header: %w", err)
	}
	h, err := cmttypes.HeaderFromProto(&ph)
	if err != nil {
		return nil, fmt.Errorf("header: %w", err)
	}
	var pc cmtproto.Commit
	if err := pc.Unmarshal(pf.GetCommit()); err != nil {
		return nil, fmt.Errorf("commit: %w", err)
	}
	c, err := cmttypes.CommitFromProto(&pc)
	if err != nil {
		return nil, fmt.Errorf("commit: %w", err)
	}
	vals, err := g.validatorSet()
	if err != nil {
		return nil, err
	}
	switch {
	case h.ChainID != g.ChainID:
		return nil, fmt.Errorf("header of chain %q, want %q", h.ChainID, g.ChainID)
	case h.Height != pf.GetHeight()+1:
		return nil, fmt.Errorf("header of height %d for a state of height %d", h.Height, pf.GetHeight())
	case !bytes.Equal(h.ValidatorsHash, vals.Hash()):
		return nil, errors.New("header names other validators than genesis")
	case !bytes.Equal(c.BlockID.Hash, h.Hash()):
		return nil, errors.New("the commit signs another block")
	}
	if err := vals.VerifyCommitLight(g.ChainID, c.BlockID, h.Height, c); err != nil {
		return nil, fmt.Errorf("commit: %w", err)
	}
	return h.AppHash, nil
}

// validatorSet is the genesis validators as CometBFT's set.
func (g ChainGenesis) validatorSet() (*cmttypes.ValidatorSet, error) {
	vs := make([]*cmttypes.Validator, 0, len(g.Validators))
	for _, v := range g.Validators {
		pub, err := cometPub(v.Peer)
		if err != nil {
			return nil, err
		}
		vs = append(vs, cmttypes.NewValidator(pub, v.Power))
	}
	set := cmttypes.NewValidatorSet(vs)
	if err := set.ValidateBasic(); err != nil {
		return nil, fmt.Errorf("genesis validators: %w", err)
	}
	return set, nil
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("ledger: encode: %v", err))
	}
	return b
}
