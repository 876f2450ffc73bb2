package ledger

import (
	"bytes"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/neuropb"
)

// fuzzActors are the fixed accounts the ledger fuzzers sign with.
func fuzzActors(t testing.TB) []*actor { return newActors(t, 3, rand.New(rand.NewPCG(41, 42))) }

// FuzzDecodeTx feeds CheckTx's decoder anyone's bytes. Properties: an
// accepted transaction encodes and decodes to the same transaction, and
// applied to a state it either changes it or, refused, leaves its hash
// exactly as it was.
func FuzzDecodeTx(f *testing.F) {
	actors := fuzzActors(f)
	g := genesisFor(actors)
	for _, body := range []func(*neuropb.LedgerTx){
		func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Transfer{Transfer: &neuropb.Transfer{To: []byte(actors[1].id), Amount: 5}}
		},
		func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Transfer{Transfer: &neuropb.Transfer{To: []byte(actors[1].id), Amount: 1 << 62}}
		},
		func(tx *neuropb.LedgerTx) { tx.Body = &neuropb.LedgerTx_Stake{Stake: &neuropb.Stake{Amount: 7}} },
		func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_Unstake{Unstake: &neuropb.Unstake{Amount: 1 << 60}}
		},
		func(tx *neuropb.LedgerTx) {
			tx.Body = &neuropb.LedgerTx_OpenEscrow{OpenEscrow: &neuropb.OpenEscrow{Amount: 9, Model: testModel().Bytes()}}
		},
	} {
		f.Add(actors[0].tx(f, body))
	}
	f.Add([]byte{})
	f.Add([]byte("\x0a\x02hi"))
	f.Fuzz(func(t *testing.T, raw []byte) {
		tx, err := DecodeTx(raw)
		if err != nil {
			return
		}
		again, err := EncodeTx(tx)
		if err != nil {
			t.Fatalf("an accepted transaction does not encode: %v", err)
		}
		tx2, err := DecodeTx(again)
		if err != nil || !proto.Equal(tx, tx2) {
			t.Fatalf("decode -> encode -> decode is not stable: %v", err)
		}
		st, err := NewState(g)
		if err != nil {
			t.Fatal(err)
		}
		before := st.Hash()
		if err := st.Apply(tx); err != nil && !bytes.Equal(st.Hash(), before) {
			t.Fatalf("a refused transaction (%v) changed the state", err)
		}
	})
}

// FuzzReadGenesis reads any bytes as a genesis file. Property: an accepted
// genesis writes and reads back to the same genesis.
func FuzzReadGenesis(f *testing.F) {
	actors := fuzzActors(f)
	dir := f.TempDir()
	seed := filepath.Join(dir, "seed.json")
	if err := WriteGenesis(seed, ChainGenesis{ChainID: "neuro-fuzz", Time: time.Unix(1_700_000_000, 0).UTC(),
		Ledger: genesisFor(actors), Validators: []Validator{{Peer: actors[0].id, Power: 10}}}); err != nil {
		f.Fatal(err)
	}
	b, err := os.ReadFile(seed)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add([]byte(`{"chain_id":"x","validators":[]}`))
	f.Add([]byte(`{`))
	f.Fuzz(func(t *testing.T, raw []byte) {
		dir := t.TempDir()
		in := filepath.Join(dir, "in.json")
		if err := os.WriteFile(in, raw, 0o600); err != nil {
			t.Fatal(err)
		}
		g, err := ReadGenesis(in)
		if err != nil {
			return
		}
		out := filepath.Join(dir, "out.json")
		if err := WriteGenesis(out, g); err != nil {
			t.Fatalf("an accepted genesis does not write: %v", err)
		}
		g2, err := ReadGenesis(out)
		if err != nil {
			t.Fatalf("a written genesis does not read back: %v", err)
		}
		if g2.ChainID != g.ChainID || !g2.Time.Equal(g.Time) || !proto.Equal(g2.Ledger, g.Ledger) || len(g2.Validators) != len(g.Validators) {
			t.Fatalf("genesis changed through write and read: %+v vs %+v", g, g2)
		}
		for i := range g.Validators {
			if g.Validators[i] != g2.Validators[i] {
				t.Fatalf("validator %d changed: %+v vs %+v", i, g.Validators[i], g2.Validators[i])
			}
		}
	})
}

// FuzzVerifyStatus reads any bytes as a validator's answer to a balance
// query, checked against the genesis validators. Property: an answer is
// accepted only if what it says of the account (balance, stake, nonce,
// height) is what the proven state holds; a forged field, proof or
// header is refused.
func FuzzVerifyStatus(f *testing.F) {
	actors := fuzzActors(f)
	g := ChainGenesis{ChainID: "neuro-fuzz-proof", Time: time.Unix(1_700_000_000, 0).UTC(), Ledger: genesisFor(actors),
		Validators: []Validator{{Peer: actors[0].id, Power: 10}}}
	c, err := StartChain(ChainConfig{Dir: filepath.Join(f.TempDir(), "v"), Key: actors[0].key, Genesis: g,
		Listen: "tcp://127.0.0.1:0", BlockInterval: 50 * time.Millisecond, Log: quietLog()})
	if err != nil {
		f.Fatal(err)
	}
	defer c.Stop()
	if err := c.Submit(actors[1].tx(f, func(tx *neuropb.LedgerTx) {
		tx.Body = &neuropb.LedgerTx_Transfer{Transfer: &neuropb.Transfer{To: []byte(actors[2].id), Amount: 7}}
	})); err != nil {
		f.Fatal(err)
	}
	var st *State
	var hdr, commit []byte
	for i := 0; ; i++ {
		if st, hdr, commit, err = c.proven(); err == nil && st.Accounts[actors[1].id.String()].Nonce == 1 {
			break
		}
		if i == 600 {
			f.Fatalf("no proven state in 60 s: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, a := range actors {
		ans := statusOf(st, st.Held(), g.ChainID, a.id)
		ans.Proof = st.prove(a.id)
		ans.Proof.Header, ans.Proof.Commit = hdr, commit
		b, err := proto.Marshal(ans)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, uint8(0))
	}
	f.Fuzz(func(t *testing.T, raw []byte, who uint8) {
		ans := &neuropb.LedgerStatus{}
		if proto.Unmarshal(raw, ans) != nil {
			return
		}
		p := actors[int(who)%len(actors)].id
		got, err := VerifyStatus(g, p, ans)
		if err != nil {
			return
		}
		var bal, staked, nonce uint64
		if acc := st.Accounts[p.String()]; acc != nil {
			bal, staked, nonce = acc.Balance, acc.Staked, acc.Nonce
		}
		if got.GetHeight() != st.Height || got.GetBalance() != bal || got.GetStaked() != staked || got.GetNonce() != nonce {
			t.Fatalf("accepted a status of %s that the proven state does not hold: height %d balance %d staked %d nonce %d, "+
				"want %d %d %d %d", p, got.GetHeight(), got.GetBalance(), got.GetStaked(), got.GetNonce(), st.Height, bal, staked, nonce)
		}
	})
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }
