package ledger

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/bits"
	"slices"
	"sort"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/neuropb"
	"github.com/neuro-p2p/neuro/reputation"
	"github.com/neuro-p2p/neuro/sign"
)

// BaseUnits is how many base units make one NEURO.
const BaseUnits = 1_000_000

// EscrowID is the ID of the escrow that payer's transaction with nonce
// opens (neuropb.EscrowID).
func EscrowID(payer peer.ID, nonce uint64) uint64 { return neuropb.EscrowID([]byte(payer), nonce) }

// DefaultParams are the economics of a new chain.
func DefaultParams() *neuropb.LedgerParams {
	return &neuropb.LedgerParams{
		TreasuryBps: 700, BurnBps: 2000, GatingBps: 1000,
		PricePerMflop: 1, MinStake: 100 * BaseUnits,
		SlashBps: 1000, BountyBps: 2000,
		UnbondingBlocks: 100, EpochBlocks: 100, InitialEmission: 1000 * BaseUnits, HalvingEpochs: 1000,
		VotingBlocks: 50, EscrowBlocks: 3600,
	}
}

// Account is one peer's funds.
type Account struct {
	Balance   uint64      `json:"balance"`
	Nonce     uint64      `json:"nonce"`
	Staked    uint64      `json:"staked"`
	Unbonding []Unbonding `json:"unbonding,omitempty"`
	// Allowances are what gating nodes (by peer ID) may draw from the
	// balance into escrows they open for this account.
	Allowances map[string]uint64 `json:"allowances,omitempty"`
}

// Unbonding is an unstaked amount waiting for its release height.
type Unbonding struct {
	Amount  uint64 `json:"amount"`
	Release int64  `json:"release"`
}

// Escrow is a client's deposit for inference on a model.
type Escrow struct {
	Payer     string `json:"payer"`
	Gating    string `json:"gating"`
	Model     string `json:"model"`
	Remaining uint64 `json:"remaining"`
	// Expires is the height at whose end what remains returns to the
	// payer.
	Expires int64 `json:"expires"`
	// Drawn: the gating node opened it from the payer's allowance, to which
	// what remains returns with the funds (the allowance bounds what the
	// gating node may keep, not what it may hold in escrow for a while).
	Drawn bool `json:"drawn,omitempty"`
}

// refund returns what is left in e to its payer (acc when the payer is
// sender, whose account may not be stored yet), and to the allowance it
// was drawn from.
func (s *State) refund(e *Escrow, sender string, acc *Account) {
	payer := acc
	if e.Payer != sender {
		payer = s.account(e.Payer)
	}
	payer.Balance += e.Remaining
	if e.Drawn && e.Remaining > 0 {
		if v, ok := add(payer.Allowances[e.Gating], e.Remaining); ok {
			setAllowance(payer, e.Gating, v)
		}
	}
	e.Remaining = 0
}

// Proposal is a governance proposal.
type Proposal struct {
	Proposer string `json:"proposer"`
	// One of AddModel and Params.
	AddModel string `json:"add_model,omitempty"`
	Params   []byte `json:"params,omitempty"` // encoded LedgerParams
	Ends     int64  `json:"ends"`
	// Votes by voter: true for yes. The stake counts when the vote closes.
	Votes  map[string]bool `json:"votes"`
	Done   bool            `json:"done"`
	Passed bool            `json:"passed"`
}

// State is the whole ledger. Every change goes through Apply and EndBlock,
// which are deterministic: the same transactions in the same order give
// the same state and the same Hash on every node. Maps are serialised
// with sorted keys; there is no floating point.
type State struct {
	Height        int64                `json:"height"`
	Accounts      map[string]*Account  `json:"accounts"`
	Escrows       map[uint64]*Escrow   `json:"escrows"`
	NextEscrow    uint64               `json:"next_escrow"`
	Proposals     map[uint64]*Proposal `json:"proposals"`
	NextProposal  uint64               `json:"next_proposal"`
	Models        map[string]bool      `json:"models"`
	Treasury      uint64               `json:"treasury"`
	Burned        uint64               `json:"burned"`
	Emitted       uint64               `json:"emitted"`
	GenesisSupply uint64               `json:"genesis_supply"`
	// Work is the FLOPs of settled expert work per peer in this epoch,
	// which the epoch's emission is paid for.
	Work map[string]uint64 `json:"work"`
	// Slashed holds the input digests of verdicts already used, so that
	// one verdict slashes once.
	Slashed map[string]bool `json:"slashed"`
	Params  []byte          `json:"params"` // encoded LedgerParams

	params *neuropb.LedgerParams
}

// NewState builds the genesis state.
func NewState(g *neuropb.LedgerGenesis) (*State, error) {
	s := emptyState()
	p := g.GetParams()
	if p == nil {
		p = DefaultParams()
	}
	if err := checkParams(p); err != nil {
		return nil, fmt.Errorf("genesis: %w", err)
	}
	if err := s.setParams(p); err != nil {
		return nil, err
	}
	for _, a := range g.GetAccounts() {
		id, err := peer.IDFromBytes(a.GetPeer())
		if err != nil {
			return nil, fmt.Errorf("genesis account: %w", err)
		}
		acc := s.account(id.String())
		var ok bool
		if acc.Balance, ok = add(acc.Balance, a.GetBalance()); !ok {
			return nil, errors.New("genesis: balance overflows")
		}
		if acc.Staked, ok = add(acc.Staked, a.GetStake()); !ok {
			return nil, errors.New("genesis: stake overflows")
		}
		total, ok := add(a.GetBalance(), a.GetStake())
		if !ok {
			return nil, errors.New("genesis: balance + stake overflows")
		}
		if s.GenesisSupply, ok = add(s.GenesisSupply, total); !ok {
			return nil, errors.New("genesis: supply overflows")
		}
		for _, al := range a.GetAllowances() {
			sp, err := peer.IDFromBytes(al.GetSpender())
			if err != nil {
				return nil, fmt.Errorf("genesis allowance of %s: %w", id, err)
			}
			setAllowance(acc, sp.String(), al.GetAmount())
		}
	}
	for _, m := range g.GetModels() {
		c, err := cid.Cast(m)
		if err != nil {
			return nil, fmt.Errorf("genesis model: %w", err)
		}
		s.Models[c.String()] = true
	}
	return s, nil
}

// emptyState is a state with no accounts and no history.
func emptyState() *State {
	return &State{Accounts: map[string]*Account{}, Escrows: map[uint64]*Escrow{}, Proposals: map[uint64]*Proposal{},
		Models: map[string]bool{}, Work: map[string]uint64{}, Slashed: map[string]bool{}, NextProposal: 1}
}

func checkParams(p *neuropb.LedgerParams) error {
	switch {
	case p.GetTreasuryBps()+p.GetGatingBps() > 10000:
		return errors.New("treasury and gating shares exceed 100%")
	case p.GetBurnBps() > 10000 || p.GetSlashBps() > 10000 || p.GetBountyBps() > 10000:
		return errors.New("a rate exceeds 100%")
	case p.GetEpochBlocks() == 0 || p.GetHalvingEpochs() == 0 || p.GetVotingBlocks() == 0 || p.GetEscrowBlocks() == 0:
		return errors.New("epoch, halving, voting and escrow periods must be positive")
	}
	return nil
}

func (s *State) setParams(p *neuropb.LedgerParams) error {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(p)
	if err != nil {
		return err
	}
	s.Params, s.params = b, p
	return nil
}

// LoadState decodes a state saved with Encode.
func LoadState(b []byte) (*State, error) {
	s := &State{}
	if err := json.Unmarshal(b, s); err != nil {
		return nil, fmt.Errorf("ledger state: %w", err)
	}
	p := &neuropb.LedgerParams{}
	if err := proto.Unmarshal(s.Params, p); err != nil {
		return nil, fmt.Errorf("ledger state: params: %w", err)
	}
	s.params = p
	for _, m := range []*map[string]bool{&s.Models, &s.Slashed} {
		if *m == nil {
			*m = map[string]bool{}
		}
	}
	if s.Accounts == nil {
		s.Accounts = map[string]*Account{}
	}
	if s.Escrows == nil {
		s.Escrows = map[uint64]*Escrow{}
	}
	if s.Proposals == nil {
		s.Proposals = map[uint64]*Proposal{}
	}
	if s.Work == nil {
		s.Work = map[string]uint64{}
	}
	return s, nil
}

// Encode serialises the state deterministically (JSON, sorted keys).
func (s *State) Encode() []byte {
	b, err := json.Marshal(s)
	if err != nil {
		// Every field is a plain value; this cannot fail.
		panic(fmt.Sprintf("ledger: encode state: %v", err))
	}
	return b
}

// Clone is a deep copy (the mempool's scratch state, and each block's
// working state). It copies field by field: a block used to clone through
// a JSON round trip, twice a block (TestCloneIsDeep keeps this in step
// with the types' fields).
func (s *State) Clone() *State {
	c := *s
	c.Accounts = cloneEach(s.Accounts, func(a *Account) {
		a.Unbonding = slices.Clone(a.Unbonding)
		a.Allowances = maps.Clone(a.Allowances)
	})
	c.Escrows = cloneEach(s.Escrows, nil)
	c.Proposals = cloneEach(s.Proposals, func(p *Proposal) {
		p.Params = slices.Clone(p.Params)
		p.Votes = maps.Clone(p.Votes)
	})
	c.Models = cloneOrEmpty(s.Models)
	c.Work = cloneOrEmpty(s.Work)
	c.Slashed = cloneOrEmpty(s.Slashed)
	c.Params = slices.Clone(s.Params)
	if s.params != nil {
		c.params = proto.Clone(s.params).(*neuropb.LedgerParams)
	}
	return &c
}

// cloneEach copies m and each value it points to, then has deep copy what
// the copied value still shares (nil: nothing).
func cloneEach[K comparable, V any](m map[K]*V, deep func(*V)) map[K]*V {
	c := make(map[K]*V, len(m))
	for k, v := range m {
		vc := *v
		if deep != nil {
			deep(&vc)
		}
		c[k] = &vc
	}
	return c
}

// cloneOrEmpty copies m, making an empty map of a nil one (as LoadState
// does).
func cloneOrEmpty[K comparable, V any](m map[K]V) map[K]V {
	if m == nil {
		return map[K]V{}
	}
	return maps.Clone(m)
}

// ParamsOf returns the current parameters.
func (s *State) ParamsOf() *neuropb.LedgerParams {
	return proto.Clone(s.params).(*neuropb.LedgerParams)
}

func (s *State) account(id string) *Account {
	a := s.Accounts[id]
	if a == nil {
		a = &Account{}
		s.Accounts[id] = a
	}
	return a
}

func add(a, b uint64) (uint64, bool) {
	s, carry := bits.Add64(a, b, 0)
	return s, carry == 0
}

// mulDiv is a*b/d without overflow (d > 0), rounded down.
func mulDiv(a, b, d uint64) uint64 {
	hi, lo := bits.Mul64(a, b)
	if hi >= d {
		return ^uint64(0)
	}
	q, _ := bits.Div64(hi, lo, d)
	return q
}

// Supply is what the invariant says must exist: genesis + emitted − burned.
func (s *State) Supply() uint64 { return s.GenesisSupply + s.Emitted - s.Burned }

// Held is everything held anywhere: balances, stakes, unbonding, escrows,
// treasury.
func (s *State) Held() uint64 {
	var t uint64
	for _, a := range s.Accounts {
		t += a.Balance + a.Staked
		for _, u := range a.Unbonding {
			t += u.Amount
		}
	}
	for _, e := range s.Escrows {
		t += e.Remaining
	}
	return t + s.Treasury
}

// CheckInvariant checks genesis supply + emitted − burned = held.
func (s *State) CheckInvariant() error {
	if s.Supply() != s.Held() {
		return fmt.Errorf("ledger invariant broken at height %d: supply %d, held %d", s.Height, s.Supply(), s.Held())
	}
	return nil
}

// TxError is a refused transaction, with its ABCI code.
type TxError struct {
	Code uint32
	Msg  string
}

func (e *TxError) Error() string { return e.Msg }

// ABCI codes of refused transactions.
const (
	CodeOK uint32 = iota
	CodeMalformed
	CodeBadSignature
	CodeBadNonce
	CodeInsufficient
	CodeNotAllowed
	CodeBadEvidence
	CodeUnknown
)

func txErr(code uint32, format string, args ...any) *TxError {
	return &TxError{Code: code, Msg: fmt.Sprintf(format, args...)}
}

// SignTx signs tx with key (setting its sender).
func SignTx(key crypto.PrivKey, tx *neuropb.LedgerTx) error {
	id, err := peer.IDFromPrivateKey(key)
	if err != nil {
		return err
	}
	tx.Sender, tx.Signature = []byte(id), nil
	tx.Signature, err = sign.Sign(key, sign.LedgerTx, tx)
	return err
}

// SignReceipt signs a usage receipt with the expert's key.
func SignReceipt(key crypto.PrivKey, r *neuropb.UsageReceipt) error {
	return reputation.SignReceipt(key, r)
}

func verifySig(signer []byte, m proto.Message, sig []byte) error {
	id, err := peer.IDFromBytes(signer)
	if err != nil {
		return fmt.Errorf("signer: %w", err)
	}
	return sign.Verify(id, sign.LedgerTx, m, sig)
}

// DecodeTx decodes and checks a transaction's form and signature (what
// does not depend on the state).
func DecodeTx(raw []byte) (*neuropb.LedgerTx, error) {
	if len(raw) > neuropb.MaxLedgerTxSize {
		return nil, txErr(CodeMalformed, "transaction of %d bytes exceeds %d", len(raw), neuropb.MaxLedgerTxSize)
	}
	tx := &neuropb.LedgerTx{}
	if err := proto.Unmarshal(raw, tx); err != nil {
		return nil, txErr(CodeMalformed, "malformed transaction: %v", err)
	}
	if tx.GetBody() == nil {
		return nil, txErr(CodeMalformed, "transaction without a body")
	}
	unsigned := proto.Clone(tx).(*neuropb.LedgerTx)
	unsigned.Signature = nil
	if err := verifySig(tx.GetSender(), unsigned, tx.GetSignature()); err != nil {
		return nil, txErr(CodeBadSignature, "sender: %v", err)
	}
	return tx, nil
}

// Apply applies one decoded transaction at the current height, or refuses
// it and changes nothing.
func (s *State) Apply(tx *neuropb.LedgerTx) error {
	sender := peer.ID(tx.GetSender()).String()
	acc := s.Accounts[sender]
	var nonce uint64
	if acc != nil {
		nonce = acc.Nonce
	}
	if tx.GetNonce() != nonce+1 {
		return txErr(CodeBadNonce, "nonce %d, want %d", tx.GetNonce(), nonce+1)
	}
	// A refused transaction changes nothing: each case checks everything
	// before it changes anything, and a new sender's account is only
	// stored once its transaction has been applied.
	if acc == nil {
		acc = &Account{}
	}
	if err := s.apply(sender, acc, tx); err != nil {
		return err
	}
	acc.Nonce = tx.GetNonce()
	s.Accounts[sender] = acc
	return nil
}

func (s *State) apply(sender string, acc *Account, tx *neuropb.LedgerTx) error {
	p := s.params
	switch b := tx.GetBody().(type) {
	case *neuropb.LedgerTx_Transfer:
		to, err := peer.IDFromBytes(b.Transfer.GetTo())
		if err != nil {
			return txErr(CodeMalformed, "transfer to: %v", err)
		}
		amt := b.Transfer.GetAmount()
		if amt == 0 || acc.Balance < amt {
			return txErr(CodeInsufficient, "transfer of %d with a balance of %d", amt, acc.Balance)
		}
		if dst := s.Accounts[to.String()]; dst != nil {
			if _, ok := add(dst.Balance, amt); !ok {
				return txErr(CodeMalformed, "transfer overflows the recipient's balance")
			}
		}
		acc.Balance -= amt
		if to.String() == sender {
			acc.Balance += amt
		} else {
			s.account(to.String()).Balance += amt
		}
	case *neuropb.LedgerTx_Stake:
		amt := b.Stake.GetAmount()
		if amt == 0 || acc.Balance < amt {
			return txErr(CodeInsufficient, "stake of %d with a balance of %d", amt, acc.Balance)
		}
		acc.Balance -= amt
		acc.Staked += amt
	case *neuropb.LedgerTx_Unstake:
		amt := b.Unstake.GetAmount()
		if amt == 0 || acc.Staked < amt {
			return txErr(CodeInsufficient, "unstake of %d with a stake of %d", amt, acc.Staked)
		}
		acc.Staked -= amt
		acc.Unbonding = append(acc.Unbonding, Unbonding{Amount: amt, Release: s.Height + int64(p.GetUnbondingBlocks())})
	case *neuropb.LedgerTx_Allow:
		sp, err := peer.IDFromBytes(b.Allow.GetSpender())
		if err != nil {
			return txErr(CodeMalformed, "allowance spender: %v", err)
		}
		if sp.String() == sender {
			return txErr(CodeMalformed, "an account cannot allow itself")
		}
		if len(acc.Allowances) >= maxAllowances && acc.Allowances[sp.String()] == 0 && b.Allow.GetAmount() > 0 {
			return txErr(CodeNotAllowed, "at most %d allowances per account", maxAllowances)
		}
		setAllowance(acc, sp.String(), b.Allow.GetAmount())
	case *neuropb.LedgerTx_OpenEscrow:
		m, err := cid.Cast(b.OpenEscrow.GetModel())
		if err != nil {
			return txErr(CodeMalformed, "escrow model: %v", err)
		}
		if !s.Models[m.String()] {
			return txErr(CodeNotAllowed, "model %s is not on the ledger (governance adds models)", m)
		}
		g, err := peer.IDFromBytes(b.OpenEscrow.GetGating())
		if err != nil {
			return txErr(CodeMalformed, "escrow gating node: %v", err)
		}
		amt := b.OpenEscrow.GetAmount()
		payer, from := sender, acc
		if raw := b.OpenEscrow.GetPayer(); len(raw) > 0 {
			pp, err := peer.IDFromBytes(raw)
			if err != nil {
				return txErr(CodeMalformed, "escrow payer: %v", err)
			}
			if pp.String() != sender {
				// The sender draws on the payer's allowance, as the
				// escrow's gating node only.
				if g.String() != sender {
					return txErr(CodeNotAllowed, "only the escrow's gating node %s may open it from another account", g)
				}
				payer, from = pp.String(), s.Accounts[pp.String()]
				if from == nil {
					return txErr(CodeInsufficient, "escrow payer %s has no account", pp)
				}
				if allowed := from.Allowances[sender]; allowed < amt {
					return txErr(CodeNotAllowed, "escrow of %d: %s allows %s only %d", amt, pp, sender, allowed)
				}
			}
		}
		if amt == 0 || from.Balance < amt {
			return txErr(CodeInsufficient, "escrow of %d with a balance of %d", amt, from.Balance)
		}
		id := EscrowID(peer.ID(tx.GetSender()), tx.GetNonce())
		if _, taken := s.Escrows[id]; taken {
			return txErr(CodeNotAllowed, "escrow %d exists", id)
		}
		from.Balance -= amt
		if from != acc {
			setAllowance(from, sender, from.Allowances[sender]-amt)
		}
		s.Escrows[id] = &Escrow{Payer: payer, Gating: g.String(), Model: m.String(), Remaining: amt,
			Expires: s.Height + int64(p.GetEscrowBlocks()), Drawn: from != acc}
	case *neuropb.LedgerTx_Settle:
		return s.settle(sender, acc, b.Settle)
	case *neuropb.LedgerTx_Slash:
		return s.slash(acc, b.Slash)
	case *neuropb.LedgerTx_Propose:
		if acc.Staked < p.GetMinStake() {
			return txErr(CodeNotAllowed, "proposals need a stake of %d, have %d", p.GetMinStake(), acc.Staked)
		}
		pr := &Proposal{Proposer: sender, Ends: s.Height + int64(p.GetVotingBlocks()), Votes: map[string]bool{}}
		switch c := b.Propose.GetChange().(type) {
		case *neuropb.Propose_AddModel:
			m, err := cid.Cast(c.AddModel)
			if err != nil {
				return txErr(CodeMalformed, "proposed model: %v", err)
			}
			pr.AddModel = m.String()
		case *neuropb.Propose_Params:
			if err := checkParams(c.Params); err != nil {
				return txErr(CodeMalformed, "proposed params: %v", err)
			}
			pr.Params, _ = proto.MarshalOptions{Deterministic: true}.Marshal(c.Params)
		default:
			return txErr(CodeMalformed, "empty proposal")
		}
		s.Proposals[s.NextProposal] = pr
		s.NextProposal++
	case *neuropb.LedgerTx_Vote:
		pr := s.Proposals[b.Vote.GetProposal()]
		if pr == nil || pr.Done {
			return txErr(CodeUnknown, "no open proposal %d", b.Vote.GetProposal())
		}
		if acc.Staked == 0 {
			return txErr(CodeNotAllowed, "only stakers vote")
		}
		pr.Votes[sender] = b.Vote.GetYes()
	default:
		return txErr(CodeMalformed, "unknown transaction type %T", b)
	}
	return nil
}

// settle pays receipts from an escrow: the treasury's cut (part of it
// burned), the gating node's share, and the experts by FLOPs. Every
// receipt must be signed by its expert and be for this escrow. Receipts of
// an expert below the minimum stake (one slashed since, perhaps during the
// very generation that used its answers) are not paid: their work stays in
// the escrow, and the others' settle.
func (s *State) settle(sender string, acc *Account, st *neuropb.Settle) error {
	e := s.Escrows[st.GetEscrow()]
	if e == nil {
		return txErr(CodeUnknown, "no escrow %d", st.GetEscrow())
	}
	if e.Gating != sender {
		return txErr(CodeNotAllowed, "escrow %d is settled by its gating node %s", st.GetEscrow(), e.Gating)
	}
	if n := len(st.GetReceipts()); (n == 0 && !st.GetClose()) || n > neuropb.MaxReceipts {
		return txErr(CodeMalformed, "%d receipts (want 1 to %d)", n, neuropb.MaxReceipts)
	}
	if len(st.GetReceipts()) == 0 {
		s.closeEscrow(st.GetEscrow(), sender, acc)
		return nil
	}
	p := s.params
	flops := map[string]uint64{}
	var total uint64
	var unstaked []string
	for i, r := range st.GetReceipts() {
		if r.GetEscrow() != st.GetEscrow() {
			return txErr(CodeMalformed, "receipt %d is for escrow %d", i, r.GetEscrow())
		}
		signer, err := reputation.VerifyReceipt(r)
		if err != nil {
			return txErr(CodeBadSignature, "receipt %d: %v", i, err)
		}
		ex := signer.String()
		if a := s.Accounts[ex]; a == nil || a.Staked < p.GetMinStake() {
			unstaked = append(unstaked, ex)
			continue
		}
		var ok bool
		if flops[ex], ok = add(flops[ex], r.GetFlops()); !ok {
			return txErr(CodeMalformed, "receipt %d: FLOPs overflow", i)
		}
		if total, ok = add(total, r.GetFlops()); !ok {
			return txErr(CodeMalformed, "receipt %d: FLOPs overflow", i)
		}
	}
	if total == 0 && len(unstaked) > 0 {
		if !st.GetClose() {
			return txErr(CodeNotAllowed, "every receipt is of an expert with less than the minimum stake %d (%s)", p.GetMinStake(), unstaked[0])
		}
		s.closeEscrow(st.GetEscrow(), sender, acc)
		return nil
	}
	if total == 0 {
		return txErr(CodeMalformed, "receipts for no work")
	}
	fee := mulDiv(total, p.GetPricePerMflop(), 1_000_000)
	fee = min(fee, e.Remaining)
	treasury := mulDiv(fee, uint64(p.GetTreasuryBps()), 10000)
	burn := mulDiv(treasury, uint64(p.GetBurnBps()), 10000)
	gating := mulDiv(fee, uint64(p.GetGatingBps()), 10000)
	pool := fee - treasury - gating
	e.Remaining -= fee
	s.Treasury += treasury - burn
	s.Burned += burn
	acc.Balance += gating
	var paid uint64
	for _, ex := range sortedKeys(flops) {
		share := mulDiv(pool, flops[ex], total)
		if ex == sender {
			acc.Balance += share
		} else {
			s.account(ex).Balance += share
		}
		paid += share
		s.Work[ex] += flops[ex]
	}
	// Rounding remainders go to the treasury, so nothing is lost.
	s.Treasury += pool - paid
	if st.GetClose() {
		s.closeEscrow(st.GetEscrow(), sender, acc)
	}
	return nil
}

// closeEscrow returns what is left in escrow id to its payer and ends it;
// sender (whose account is acc, perhaps not yet stored) settles it.
func (s *State) closeEscrow(id uint64, sender string, acc *Account) {
	s.refund(s.Escrows[id], sender, acc)
	delete(s.Escrows, id)
}

// maxAllowances bounds an account's allowances (each is state every node
// keeps).
const maxAllowances = 64

// setAllowance sets acc's allowance to spender (0 removes it).
func setAllowance(acc *Account, spender string, amount uint64) {
	if amount == 0 {
		delete(acc.Allowances, spender)
		if len(acc.Allowances) == 0 {
			acc.Allowances = nil
		}
		return
	}
	if acc.Allowances == nil {
		acc.Allowances = map[string]uint64{}
	}
	acc.Allowances[spender] = amount
}

// slash takes slash_bps of the accused's stake on a verdict whose judge
// holds the minimum stake and which carries the accused's own signed
// receipt for the output it convicts (so that no judge can frame a peer), pays the reporter bounty_bps of it and burns
// the rest. A verdict slashes once.
func (s *State) slash(reporter *Account, sl *neuropb.Slash) error {
	v := sl.GetVerdict()
	_, accused, _, _, err := reputation.VerifyVerdict(v)
	if err != nil {
		return txErr(CodeBadEvidence, "evidence: %v", err)
	}
	if v.GetAccusedReceipt() == nil {
		return txErr(CodeBadEvidence, "evidence: no receipt of the accused binds it to the output")
	}
	judge := peer.ID(v.GetJudge()).String()
	if a := s.Accounts[judge]; a == nil || a.Staked < s.params.GetMinStake() {
		return txErr(CodeBadEvidence, "evidence: judge %s is not staked", judge)
	}
	key := fmt.Sprintf("%x/%s", v.GetInputDigest(), accused)
	if s.Slashed[key] {
		return txErr(CodeBadEvidence, "evidence already used")
	}
	acc := s.Accounts[accused.String()]
	if acc == nil || acc.Staked == 0 {
		return txErr(CodeBadEvidence, "accused %s has no stake", accused)
	}
	cut := mulDiv(acc.Staked, uint64(s.params.GetSlashBps()), 10000)
	bounty := mulDiv(cut, uint64(s.params.GetBountyBps()), 10000)
	acc.Staked -= cut
	reporter.Balance += bounty
	s.Burned += cut - bounty
	s.Slashed[key] = true
	return nil
}

// EndBlock runs the block's housekeeping at height h: releases unbonded
// stake, refunds expired escrows, closes votes, and at the end of an epoch pays the epoch's
// emission to the peers whose work was settled in it, by FLOPs.
func (s *State) EndBlock(h int64) {
	s.Height = h
	for _, id := range sortedKeys(s.Accounts) {
		a := s.Accounts[id]
		kept := a.Unbonding[:0]
		for _, u := range a.Unbonding {
			if u.Release <= h {
				a.Balance += u.Amount
			} else {
				kept = append(kept, u)
			}
		}
		a.Unbonding = kept
		if len(a.Unbonding) == 0 {
			a.Unbonding = nil
		}
	}
	for _, id := range sortedKeys(s.Escrows) {
		if e := s.Escrows[id]; e.Expires <= h {
			s.refund(e, "", nil)
			delete(s.Escrows, id)
		}
	}
	for _, id := range sortedKeys(s.Proposals) {
		pr := s.Proposals[id]
		if pr.Done || pr.Ends > h {
			continue
		}
		var yes, all uint64
		for _, v := range sortedKeys(s.Accounts) {
			all += s.Accounts[v].Staked
			if pr.Votes[v] {
				yes += s.Accounts[v].Staked
			}
		}
		pr.Done, pr.Passed = true, all > 0 && 2*yes > all
		if pr.Passed {
			if pr.AddModel != "" {
				s.Models[pr.AddModel] = true
			} else if len(pr.Params) > 0 {
				np := &neuropb.LedgerParams{}
				if proto.Unmarshal(pr.Params, np) == nil && checkParams(np) == nil {
					_ = s.setParams(np)
				}
			}
		}
	}
	p := s.params
	if h > 0 && uint64(h)%p.GetEpochBlocks() == 0 {
		epoch := uint64(h)/p.GetEpochBlocks() - 1
		emission := p.GetInitialEmission()
		if halvings := epoch / p.GetHalvingEpochs(); halvings < 64 {
			emission >>= halvings
		} else {
			emission = 0
		}
		var total uint64
		for _, w := range s.Work {
			total += w
		}
		if total > 0 && emission > 0 {
			for _, id := range sortedKeys(s.Work) {
				share := mulDiv(emission, s.Work[id], total)
				s.account(id).Balance += share
				s.Emitted += share
			}
		}
		s.Work = map[string]uint64{}
	}
}

func sortedKeys[K string | uint64, V any](m map[K]V) []K {
	out := make([]K, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}
