package ledger

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	abci "github.com/cometbft/cometbft/abci/types"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/internal/atomicfile"
	"github.com/neuro-p2p/neuro/neuropb"
)

// App is the ledger as a CometBFT ABCI application. Its contract: the
// same transactions in the same blocks give the same state and the same
// app hash (State.Hash) on every node. CheckTx runs transactions against
// a scratch copy of the committed state, so that a sender's successive
// nonces enter the mempool; FinalizeBlock applies a block's transactions
// in order (a refused one changes nothing) and runs EndBlock; Commit saves
// the state atomically, so that after a crash Info tells CometBFT the last
// height the app holds and CometBFT replays the blocks after it.
type App struct {
	abci.BaseApplication

	path    string // the committed state's file ("" in memory)
	genesis *neuropb.LedgerGenesis

	mu      sync.Mutex
	state   *State // committed
	prev    *State // committed before it
	pending *State // being built by FinalizeBlock, committed by Commit
	check   *State // the mempool's view
	// AfterBlock, if set, is called with every finalized state (tests
	// check the supply invariant there).
	AfterBlock func(*State)
}

var _ abci.Application = (*App)(nil)

// StateFile is the file in a ledger directory that holds the committed
// state.
const StateFile = "state.json"

// NewApp opens the ledger in dir (its committed state, if any) with
// genesis for a new chain. dir "" keeps everything in memory.
func NewApp(dir string, genesis *neuropb.LedgerGenesis) (*App, error) {
	a := &App{genesis: genesis}
	if dir != "" {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("ledger: %w", err)
		}
		a.path = filepath.Join(dir, StateFile)
		b, err := os.ReadFile(a.path)
		switch {
		case err == nil:
			if a.state, err = LoadState(b); err != nil {
				return nil, err
			}
		case !errors.Is(err, os.ErrNotExist):
			return nil, fmt.Errorf("ledger: %w", err)
		}
	}
	if a.state == nil {
		s, err := NewState(genesis)
		if err != nil {
			return nil, err
		}
		a.state = s
	}
	a.check = a.state.Clone()
	return a, nil
}

// State returns a copy of the committed state.
func (a *App) State() *State {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.state.Clone()
}

// committed returns the last two committed states (prev nil before the
// second commit). Committed states are never changed: share, do not edit.
func (a *App) committed() (state, prev *State) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.state, a.prev
}

// Info implements abci.Application.
func (a *App) Info(context.Context, *abci.InfoRequest) (*abci.InfoResponse, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	resp := &abci.InfoResponse{Data: "neuro ledger", Version: "1", AppVersion: 1, LastBlockHeight: a.state.Height}
	if a.state.Height > 0 {
		resp.LastBlockAppHash = a.state.Hash()
	}
	return resp, nil
}

// InitChain implements abci.Application: the genesis state's hash.
func (a *App) InitChain(context.Context, *abci.InitChainRequest) (*abci.InitChainResponse, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return &abci.InitChainResponse{AppHash: a.state.Hash()}, nil
}

// CheckTx implements abci.Application.
func (a *App) CheckTx(_ context.Context, req *abci.CheckTxRequest) (*abci.CheckTxResponse, error) {
	tx, err := DecodeTx(req.Tx)
	if err == nil {
		a.mu.Lock()
		err = a.check.Apply(tx)
		a.mu.Unlock()
	}
	if err != nil {
		return &abci.CheckTxResponse{Code: codeOf(err), Log: err.Error()}, nil
	}
	return &abci.CheckTxResponse{Code: abci.CodeTypeOK}, nil
}

func codeOf(err error) uint32 {
	var te *TxError
	if errors.As(err, &te) {
		return te.Code
	}
	return CodeMalformed
}

// FinalizeBlock implements abci.Application.
func (a *App) FinalizeBlock(_ context.Context, req *abci.FinalizeBlockRequest) (*abci.FinalizeBlockResponse, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := a.state.Clone()
	s.Height = req.Height
	results := make([]*abci.ExecTxResult, len(req.Txs))
	for i, raw := range req.Txs {
		tx, err := DecodeTx(raw)
		if err == nil {
			err = s.Apply(tx)
		}
		if err != nil {
			results[i] = &abci.ExecTxResult{Code: codeOf(err), Log: err.Error()}
			continue
		}
		results[i] = &abci.ExecTxResult{Code: abci.CodeTypeOK}
	}
	s.EndBlock(req.Height)
	a.pending = s
	if a.AfterBlock != nil {
		a.AfterBlock(s)
	}
	return &abci.FinalizeBlockResponse{TxResults: results, AppHash: s.Hash()}, nil
}

// Commit implements abci.Application: the block's state becomes the
// committed one, on disk first.
func (a *App) Commit(context.Context, *abci.CommitRequest) (*abci.CommitResponse, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.pending == nil {
		return &abci.CommitResponse{}, nil
	}
	if a.path != "" {
		if err := atomicfile.Write(a.path, a.pending.Encode(), 0o600); err != nil {
			return nil, fmt.Errorf("ledger: commit: %w", err)
		}
	}
	a.prev, a.state, a.pending = a.state, a.pending, nil
	a.check = a.state.Clone()
	return &abci.CommitResponse{}, nil
}

// Query implements abci.Application: path "account" with the peer ID as
// data gives the account as JSON; "state" gives the chain's totals.
func (a *App) Query(_ context.Context, req *abci.QueryRequest) (*abci.QueryResponse, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	switch req.Path {
	case "account":
		acc := a.state.Accounts[string(req.Data)]
		if acc == nil {
			acc = &Account{}
		}
		b, _ := jsonMarshal(acc)
		return &abci.QueryResponse{Value: b, Height: a.state.Height}, nil
	case "state":
		b, _ := jsonMarshal(map[string]any{"height": a.state.Height, "treasury": a.state.Treasury, "burned": a.state.Burned,
			"emitted": a.state.Emitted, "supply": a.state.Supply(), "params": protojson.Format(a.state.ParamsOf())})
		return &abci.QueryResponse{Value: b, Height: a.state.Height}, nil
	}
	return &abci.QueryResponse{Code: CodeUnknown, Log: fmt.Sprintf("unknown query path %q", req.Path)}, nil
}

// EncodeTx serialises a signed transaction for the chain.
func EncodeTx(tx *neuropb.LedgerTx) ([]byte, error) { return proto.Marshal(tx) }

func jsonMarshal(v any) ([]byte, error) { return json.Marshal(v) }
