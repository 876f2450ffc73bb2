package ledger

import (
	"bytes"
	"reflect"
	"testing"
)

// fullState has every field of State and of what it holds set, so that a
// copy that shares or drops anything shows.
func fullState(t *testing.T) *State {
	t.Helper()
	s, err := NewState(genesisFor(nil))
	if err != nil {
		t.Fatal(err)
	}
	s.Height, s.NextEscrow, s.NextProposal = 9, 4, 3
	s.Treasury, s.Burned, s.Emitted, s.GenesisSupply = 5, 6, 7, 8
	s.Accounts["a"] = &Account{Balance: 1, Nonce: 2, Staked: 3, Unbonding: []Unbonding{{Amount: 4, Release: 5}},
		Allowances: map[string]uint64{"g": 6}}
	s.Escrows[1] = &Escrow{Payer: "a", Gating: "g", Model: "m", Remaining: 7, Expires: 8, Drawn: true}
	s.Proposals[2] = &Proposal{Proposer: "a", AddModel: "m2", Params: []byte{1, 2}, Ends: 9, Votes: map[string]bool{"a": true},
		Done: true, Passed: true}
	s.Models["m"] = true
	s.Work["a"] = 10
	s.Slashed["d"] = true
	return s
}

// A clone encodes as the original does, and nothing done to the clone
// reaches the original. The field counts keep Clone in step with the
// types: a new field fails here until Clone copies it (and fullState
// sets it).
func TestCloneIsDeep(t *testing.T) {
	for typ, n := range map[reflect.Type]int{
		reflect.TypeFor[State](): 15, reflect.TypeFor[Account](): 5, reflect.TypeFor[Escrow](): 6,
		reflect.TypeFor[Proposal](): 7, reflect.TypeFor[Unbonding](): 2,
	} {
		if typ.NumField() != n {
			t.Fatalf("%v has %d fields, Clone and this test know %d: copy the new ones in Clone", typ, typ.NumField(), n)
		}
	}
	s := fullState(t)
	want := s.Encode()
	c := s.Clone()
	if !bytes.Equal(c.Encode(), want) || !bytes.Equal(c.Hash(), s.Hash()) {
		t.Fatalf("clone encodes differently:\n%s\n%s", c.Encode(), want)
	}
	round, err := LoadState(want)
	if err != nil || !reflect.DeepEqual(c, round) {
		t.Fatalf("clone %+v\nround trip %+v (%v)", c, round, err)
	}
	a := c.Accounts["a"]
	a.Balance++
	a.Unbonding[0].Amount++
	a.Allowances["g"]++
	c.Escrows[1].Remaining++
	p := c.Proposals[2]
	p.Params[0]++
	p.Votes["a"] = false
	c.Models["m"] = false
	c.Work["a"]++
	c.Slashed["d"] = false
	c.Params[0]++
	c.params.BurnBps++
	c.Accounts["b"], c.Escrows[9], c.Proposals[9] = &Account{}, &Escrow{}, &Proposal{}
	if got := s.Encode(); !bytes.Equal(got, want) || s.params.GetBurnBps() == c.params.GetBurnBps() {
		t.Fatalf("a change to the clone reached the original:\n%s\n%s", got, want)
	}
}
