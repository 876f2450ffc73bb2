package ledger

import (
	"bytes"
	"io"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	cmtproto "github.com/cometbft/cometbft/api/cometbft/types/v1"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/neuropb"
)

// A validator's status answers are proven: a status verifies against the
// genesis validators, shows an account or proves it absent, and any change
// to the answer, its header, its commit or the trusted genesis is refused.
func TestStatusProofs(t *testing.T) {
	rng := rand.New(rand.NewPCG(23, 5))
	actors := newActors(t, 5, rng)
	g := ChainGenesis{ChainID: "neuro-proof", Time: time.Unix(1_700_000_000, 0).UTC(), Ledger: genesisFor(actors[:4]),
		Validators: []Validator{{Peer: actors[0].id, Power: 10}}}
	c, err := StartChain(ChainConfig{Dir: filepath.Join(t.TempDir(), "v"), Key: actors[0].key, Genesis: g,
		Listen: "tcp://127.0.0.1:0", BlockInterval: 50 * time.Millisecond, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Stop() })
	submit := func(a *actor, body func(*neuropb.LedgerTx)) {
		t.Helper()
		if err := c.Submit(a.tx(t, body)); err != nil {
			t.Fatal(err)
		}
	}
	submit(actors[1], func(tx *neuropb.LedgerTx) {
		tx.Body = &neuropb.LedgerTx_Transfer{Transfer: &neuropb.Transfer{To: []byte(actors[2].id), Amount: 7}}
	})
	submit(actors[1], func(tx *neuropb.LedgerTx) {
		tx.Body = &neuropb.LedgerTx_Propose{Propose: &neuropb.Propose{Change: &neuropb.Propose_AddModel{AddModel: testModel().Bytes()}}}
	})
	submit(actors[3], func(tx *neuropb.LedgerTx) {
		tx.Body = &neuropb.LedgerTx_Vote{Vote: &neuropb.Vote{Proposal: 1, Yes: true}}
	})
	// Wait for a proven state that holds all three.
	var st *State
	var hdr, commit []byte
	for i := 0; ; i++ {
		if st, hdr, commit, err = c.proven(); err == nil && st.Accounts[actors[3].id.String()].Nonce == 1 {
			break
		}
		if i == 600 {
			t.Fatalf("transactions not proven in 60 s: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	answer := func(p peer.ID) *neuropb.LedgerStatus {
		out := statusOf(st, st.Held(), g.ChainID, p)
		out.Proof = st.prove(p)
		out.Proof.Header, out.Proof.Commit = hdr, commit
		return out
	}
	// A present account: every field as the state has it.
	got, err := VerifyStatus(g, actors[1].id, answer(actors[1].id))
	if err != nil {
		t.Fatal(err)
	}
	want := statusOf(st, st.Held(), g.ChainID, actors[1].id)
	want.AppHash, want.Proof = st.Hash(), got.Proof
	if !proto.Equal(got, want) {
		t.Fatalf("verified status\n%v\nwant\n%v", got, want)
	}
	if got.Balance != 10_000*BaseUnits-7 || got.Nonce != 2 || len(got.Proposals) != 1 || got.Proposals[0].YesStake != 200*BaseUnits {
		t.Fatalf("status %v", got)
	}
	// Absent accounts, before the first, between and after the last.
	for _, a := range newActors(t, 64, rand.New(rand.NewPCG(1, 1))) {
		id := a.id
		got, err := VerifyStatus(g, id, answer(id))
		if err != nil {
			t.Fatalf("absent %s: %v", id, err)
		}
		if got.Balance != 0 || got.Nonce != 0 || got.Height != st.Height {
			t.Fatalf("absent account: %v", got)
		}
	}
	// Forgeries.
	other := newActors(t, 1, rand.New(rand.NewPCG(99, 99)))[0]
	forged := map[string]func(*neuropb.LedgerStatus) (ChainGenesis, peer.ID){
		"account value changed": func(s *neuropb.LedgerStatus) (ChainGenesis, peer.ID) {
			s.Proof.Accounts[0].Value = bytes.Replace(s.Proof.Accounts[0].Value, []byte(`"balance":`), []byte(`"balance":1`), 1)
			return g, actors[1].id
		},
		"global leaf changed": func(s *neuropb.LedgerStatus) (ChainGenesis, peer.ID) {
			s.Proof.Global.Value = bytes.Replace(s.Proof.Global.Value, []byte(`"treasury":`), []byte(`"treasury":1`), 1)
			return g, actors[1].id
		},
		"present account shown absent": func(s *neuropb.LedgerStatus) (ChainGenesis, peer.ID) {
			return g, actors[2].id // the proof is of actors[4]'s absence
		},
		"no proof": func(s *neuropb.LedgerStatus) (ChainGenesis, peer.ID) {
			s.Proof = nil
			return g, actors[1].id
		},
		"state of another height": func(s *neuropb.LedgerStatus) (ChainGenesis, peer.ID) {
			s.Proof.Height--
			return g, actors[1].id
		},
		"other chain": func(s *neuropb.LedgerStatus) (ChainGenesis, peer.ID) {
			g2 := g
			g2.ChainID = "neuro-other"
			return g2, actors[1].id
		},
		"other validators": func(s *neuropb.LedgerStatus) (ChainGenesis, peer.ID) {
			g2 := g
			g2.Validators = []Validator{{Peer: other.id, Power: 10}}
			return g2, actors[1].id
		},
		"signature changed": func(s *neuropb.LedgerStatus) (ChainGenesis, peer.ID) {
			var pc cmtproto.Commit
			if err := pc.Unmarshal(s.Proof.Commit); err != nil {
				t.Fatal(err)
			}
			pc.Signatures[0].Signature[3] ^= 1
			s.Proof.Commit, _ = pc.Marshal()
			return g, actors[1].id
		},
		"garbage header": func(s *neuropb.LedgerStatus) (ChainGenesis, peer.ID) {
			s.Proof.Header = []byte{1, 2, 3}
			return g, actors[1].id
		},
	}
	for name, forge := range forged {
		s := answer(actors[1].id)
		if name == "present account shown absent" {
			s = answer(actors[4].id)
		}
		gen, p := forge(s)
		if _, err := VerifyStatus(gen, p, s); err == nil {
			t.Errorf("%s: accepted", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}
