package node

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/ledger"
	"github.com/neuro-p2p/neuro/neuropb"
)

// LedgerPath is the control API's ledger endpoint: GET for the chain's
// status and an account (?peer=ID, default this node), POST a LedgerTxRequest
// to sign and submit a transaction with this node's key.
const LedgerPath = "/api/v1/ledger"

// LedgerInfo is the ledger part of the control API.
type LedgerInfo struct {
	ChainID   string `json:"chain_id"`
	Validator bool   `json:"validator"`
	Height    int64  `json:"height"`
	AppHash   string `json:"app_hash"`
	Peer      string `json:"peer"`
	Balance   uint64 `json:"balance"`
	// Escrowed is what the account holds in open escrows.
	Escrowed  uint64 `json:"escrowed"`
	Staked    uint64 `json:"staked"`
	Unbonding uint64 `json:"unbonding"`
	Nonce     uint64 `json:"nonce"`
	Treasury  uint64 `json:"treasury"`
	Burned    uint64 `json:"burned"`
	Emitted   uint64 `json:"emitted"`
	Supply    uint64 `json:"supply"`
	// SupplyOK is true when genesis + emitted − burned equals everything
	// held.
	SupplyOK bool `json:"supply_ok"`
	// Proposals are the chain's governance proposals.
	Proposals []ProposalInfo `json:"proposals"`
	// Allowances are what the account lets gating nodes (by peer ID) draw
	// into escrows for it, in base units.
	Allowances map[string]uint64 `json:"allowances"`
	// Source says where the figures come from: "local chain" on a
	// validator, or on any other node "proven by validator PEER": a
	// validator's answer checked against a header its peers signed (more
	// than 2/3 of the genesis voting power) and Merkle proofs of the state.
	Source string `json:"source"`
}

// ProposalInfo is one governance proposal.
type ProposalInfo struct {
	ID       uint64 `json:"id"`
	Proposer string `json:"proposer"`
	AddModel string `json:"add_model,omitempty"`
	Params   bool   `json:"params,omitempty"`
	Ends     int64  `json:"ends"`
	Done     bool   `json:"done"`
	Passed   bool   `json:"passed"`
	Yes      uint64 `json:"yes_stake"`
	No       uint64 `json:"no_stake"`
}

// LedgerTxRequest asks the node to sign and submit a transaction.
type LedgerTxRequest struct {
	// Type is transfer, stake, unstake or escrow.
	Type   string `json:"type"`
	To     string `json:"to,omitempty"`
	Amount uint64 `json:"amount"`
	// Model and Gating (CID, peer ID) for an escrow; Model for a proposal
	// to add it.
	Model  string `json:"model,omitempty"`
	Gating string `json:"gating,omitempty"`
	// Proposal and Yes for a vote.
	Proposal uint64 `json:"proposal,omitempty"`
	Yes      bool   `json:"yes,omitempty"`
	// Signed is a transaction a wallet signed (Type "signed"): the node
	// relays it as it is.
	Signed []byte `json:"signed,omitempty"`
}

// LedgerTxResult is what submitting a transaction gave.
type LedgerTxResult struct {
	Submitted bool   `json:"submitted"`
	Nonce     uint64 `json:"nonce"`
	// Escrow is the ID of the escrow an escrow transaction opens.
	Escrow uint64 `json:"escrow,omitempty"`
}

func (n *Node) ledgerInfo(ctx context.Context, p peer.ID) (*LedgerInfo, error) {
	if n.ledger == nil {
		return nil, errors.New("this node takes no part in a ledger (set ledger.genesis)")
	}
	st, err := n.ledger.Status(ctx, p)
	if err != nil {
		return nil, err
	}
	info := &LedgerInfo{ChainID: st.GetChainId(), Validator: n.ledger.Validator(), Height: st.GetHeight(),
		AppHash: hex.EncodeToString(st.GetAppHash()), Peer: p.String(), Balance: st.GetBalance(), Escrowed: st.GetEscrowed(), Staked: st.GetStaked(),
		Unbonding: st.GetUnbonding(), Nonce: st.GetNonce(), Treasury: st.GetTreasury(), Burned: st.GetBurned(),
		Emitted: st.GetEmitted(), Supply: st.GetSupply(), SupplyOK: st.GetSupply() == st.GetHeld(), Proposals: []ProposalInfo{},
		Source: "local chain", Allowances: map[string]uint64{}}
	for _, a := range st.GetAllowances() {
		info.Allowances[peer.ID(a.GetSpender()).String()] = a.GetAmount()
	}
	if from := st.GetProof().GetValidator(); from != nil {
		info.Source = "proven by validator " + peer.ID(from).String()
	}
	for _, pr := range st.GetProposals() {
		pi := ProposalInfo{ID: pr.GetId(), Proposer: peer.ID(pr.GetProposer()).String(), Params: pr.GetParams() != nil,
			Ends: pr.GetEnds(), Done: pr.GetDone(), Passed: pr.GetPassed(), Yes: pr.GetYesStake(), No: pr.GetNoStake()}
		if c, err := cid.Cast(pr.GetAddModel()); err == nil {
			pi.AddModel = c.String()
		}
		info.Proposals = append(info.Proposals, pi)
	}
	return info, nil
}

func (n *Node) serveLedger(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 15*time.Second)
	defer cancel()
	fail := func(status int, err error) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
	}
	p := n.p2p.ID()
	if s := r.URL.Query().Get("peer"); s != "" {
		var err error
		if p, err = peer.Decode(s); err != nil {
			fail(http.StatusBadRequest, fmt.Errorf("peer %q: %w", s, err))
			return
		}
	}
	if r.Method == http.MethodPost {
		var req LedgerTxRequest
		if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&req); err != nil {
			fail(http.StatusBadRequest, fmt.Errorf("request: %w", err))
			return
		}
		if n.ledger == nil {
			fail(http.StatusConflict, errors.New("this node takes no part in a ledger (set ledger.genesis)"))
			return
		}
		if req.Type == "signed" {
			n.relaySigned(ctx, w, req.Signed, fail)
			return
		}
		var to, gatingPeer peer.ID
		var model cid.Cid
		var err error
		switch req.Type {
		case "transfer", "allow":
			if to, err = peer.Decode(req.To); err != nil {
				fail(http.StatusBadRequest, fmt.Errorf("to %q: %w", req.To, err))
				return
			}
		case "escrow":
			if model, err = cid.Decode(req.Model); err != nil {
				fail(http.StatusBadRequest, fmt.Errorf("model %q: %w", req.Model, err))
				return
			}
			if gatingPeer, err = peer.Decode(req.Gating); err != nil {
				fail(http.StatusBadRequest, fmt.Errorf("gating %q: %w", req.Gating, err))
				return
			}
		case "propose":
			if model, err = cid.Decode(req.Model); err != nil {
				fail(http.StatusBadRequest, fmt.Errorf("model %q: %w", req.Model, err))
				return
			}
		case "stake", "unstake", "vote":
		default:
			fail(http.StatusBadRequest, fmt.Errorf("transaction type %q: want transfer, stake, unstake, escrow, allow, propose, vote or signed", req.Type))
			return
		}
		tx, err := n.ledger.Send(ctx, func(tx *neuropb.LedgerTx) {
			switch req.Type {
			case "transfer":
				tx.Body = &neuropb.LedgerTx_Transfer{Transfer: &neuropb.Transfer{To: []byte(to), Amount: req.Amount}}
			case "allow":
				tx.Body = &neuropb.LedgerTx_Allow{Allow: &neuropb.Allow{Spender: []byte(to), Amount: req.Amount}}
			case "stake":
				tx.Body = &neuropb.LedgerTx_Stake{Stake: &neuropb.Stake{Amount: req.Amount}}
			case "unstake":
				tx.Body = &neuropb.LedgerTx_Unstake{Unstake: &neuropb.Unstake{Amount: req.Amount}}
			case "escrow":
				tx.Body = &neuropb.LedgerTx_OpenEscrow{OpenEscrow: &neuropb.OpenEscrow{Model: model.Bytes(), Gating: []byte(gatingPeer), Amount: req.Amount}}
			case "propose":
				tx.Body = &neuropb.LedgerTx_Propose{Propose: &neuropb.Propose{Change: &neuropb.Propose_AddModel{AddModel: model.Bytes()}}}
			case "vote":
				tx.Body = &neuropb.LedgerTx_Vote{Vote: &neuropb.Vote{Proposal: req.Proposal, Yes: req.Yes}}
			}
		})
		if err != nil {
			fail(http.StatusBadRequest, err)
			return
		}
		res := LedgerTxResult{Submitted: true, Nonce: tx.GetNonce()}
		if req.Type == "escrow" {
			res.Escrow = ledger.EscrowID(n.p2p.ID(), tx.GetNonce())
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(res)
		return
	}
	info, err := n.ledgerInfo(ctx, p)
	if err != nil {
		fail(http.StatusServiceUnavailable, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(info)
}

// relaySigned submits a transaction a wallet signed.
func (n *Node) relaySigned(ctx context.Context, w http.ResponseWriter, raw []byte, fail func(int, error)) {
	tx, err := ledger.DecodeTx(raw)
	if err != nil {
		fail(http.StatusBadRequest, err)
		return
	}
	if err := n.ledger.Submit(ctx, tx); err != nil {
		fail(http.StatusBadRequest, err)
		return
	}
	res := LedgerTxResult{Submitted: true, Nonce: tx.GetNonce()}
	if tx.GetOpenEscrow() != nil {
		res.Escrow = ledger.EscrowID(peer.ID(tx.GetSender()), tx.GetNonce())
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(res)
}

// FetchLedger asks the node whose control API listens on addr for the
// ledger status of peer ("" for the node itself).
func FetchLedger(ctx context.Context, addr, p string) (*LedgerInfo, error) {
	path := LedgerPath
	if p != "" {
		path += "?peer=" + p
	}
	var info LedgerInfo
	if err := apiCall(ctx, addr, http.MethodGet, path, nil, &info); err != nil {
		return nil, fmt.Errorf("ledger: %w", err)
	}
	return &info, nil
}

// SubmitLedgerTx asks the node at addr to sign and submit req.
func SubmitLedgerTx(ctx context.Context, addr string, req LedgerTxRequest) (*LedgerTxResult, error) {
	body, _ := json.Marshal(req)
	var out LedgerTxResult
	if err := apiCall(ctx, addr, http.MethodPost, LedgerPath, body, &out); err != nil {
		return nil, fmt.Errorf("ledger: %w", err)
	}
	return &out, nil
}

func apiCall(ctx context.Context, addr, method, path string, body []byte, out any) error {
	_, url := apiURL(addr, path)
	req, err := http.NewRequestWithContext(ctx, method, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := apiDo(addr, req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("HTTP %s", resp.Status)
	}
	return json.Unmarshal(b, out)
}
