package neuropb

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"math"
	"strings"
	"unsafe"

	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/multiformats/go-multihash"
)

// ErrInvalid is wrapped by every validation error of this package.
var ErrInvalid = errors.New("invalid message")

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// Validate checks every field of a decoded Heartbeat against its limits.
// It does not check that PeerId matches the gossip signer; the topic
// validator does that.
func (h *Heartbeat) Validate() error {
	if h == nil {
		return invalid("heartbeat: nil")
	}
	if _, err := peer.IDFromBytes(h.GetPeerId()); err != nil {
		return invalid("heartbeat: peer_id: %v", err)
	}
	if len(h.GetRoles()) > MaxRoles {
		return invalid("heartbeat: %d roles, at most %d", len(h.GetRoles()), MaxRoles)
	}
	for _, r := range h.GetRoles() {
		if _, ok := Role_name[int32(r)]; !ok || r == Role_ROLE_UNSPECIFIED {
			return invalid("heartbeat: unknown role %d", int32(r))
		}
	}
	if h.GetIntervalMs() > MaxHeartbeatIntervalMs {
		return invalid("heartbeat: interval %d ms, at most %d", h.GetIntervalMs(), MaxHeartbeatIntervalMs)
	}
	if len(h.GetVersion()) > MaxVersionLen {
		return invalid("heartbeat: version is %d bytes, at most %d", len(h.GetVersion()), MaxVersionLen)
	}
	if len(h.GetAddrs()) > MaxHeartbeatAddrs {
		return invalid("heartbeat: %d addrs, at most %d", len(h.GetAddrs()), MaxHeartbeatAddrs)
	}
	for i, a := range h.GetAddrs() {
		if len(a) > MaxAddrLen {
			return invalid("heartbeat: addrs[%d] is %d bytes, at most %d", i, len(a), MaxAddrLen)
		}
		if _, err := ma.NewMultiaddrBytes(a); err != nil {
			return invalid("heartbeat: addrs[%d]: %v", i, err)
		}
	}
	if len(h.GetHosted()) > MaxHostedModels {
		return invalid("heartbeat: %d hosted models, at most %d", len(h.GetHosted()), MaxHostedModels)
	}
	total := 0
	for i, hm := range h.GetHosted() {
		if _, err := cid.Cast(hm.GetModel()); err != nil {
			return invalid("heartbeat: hosted[%d]: model cid: %v", i, err)
		}
		total += len(hm.GetExperts()) + len(hm.GetLoading())
		if len(hm.GetSpans()) > MaxHostedSpans {
			return invalid("heartbeat: hosted[%d]: %d spans, at most %d", i, len(hm.GetSpans()), MaxHostedSpans)
		}
		for j, sp := range hm.GetSpans() {
			if sp.GetFirst() >= sp.GetEnd() || sp.GetEnd() > 1<<16 {
				return invalid("heartbeat: hosted[%d]: span %d is layers [%d, %d)", i, j, sp.GetFirst(), sp.GetEnd())
			}
		}
	}
	if total > MaxHostedExperts {
		return invalid("heartbeat: %d hosted experts, at most %d", total, MaxHostedExperts)
	}
	if c := h.GetCapacity(); c != nil {
		if tps := c.GetTokensPerSecond(); tps < 0 || tps != tps {
			return invalid("heartbeat: tokens per second %v", tps)
		}
		if hw := c.GetHardware(); len(hw.GetCpu()) > MaxVersionLen*2 || len(hw.GetGpu()) > MaxVersionLen*2 {
			return invalid("heartbeat: hardware names too long")
		}
		if err := validateDevices(c.GetHardware().GetDevices()); err != nil {
			return err
		}
	}
	return nil
}

// MaxDevices bounds the devices a heartbeat lists.
const MaxDevices = 16

// MaxSegments bounds the generations batched in one expert request.
const MaxSegments = 256

// MaxGroup bounds the experts asked in one expert request's group (the
// opener's expert and its members').
const MaxGroup = 64

// MaxReceiptBatch bounds the receipts signed at once (UsageReceipt.batch):
// a settlement of MaxReceipts such receipts stays within MaxLedgerTxSize.
const MaxReceiptBatch = 16

func validateDevices(ds []*Device) error {
	if len(ds) > MaxDevices {
		return invalid("heartbeat: %d devices, at most %d", len(ds), MaxDevices)
	}
	selected := 0
	for i, d := range ds {
		if len(d.GetBackend()) > 32 || len(d.GetName()) > 64 || len(d.GetDescription()) > MaxVersionLen*2 || len(d.GetType()) > 16 {
			return invalid("heartbeat: device %d: names too long", i)
		}
		if d.GetMemoryFreeBytes() > d.GetMemoryTotalBytes() {
			return invalid("heartbeat: device %d: %d bytes free of %d", i, d.GetMemoryFreeBytes(), d.GetMemoryTotalBytes())
		}
		if tps := d.GetExpertTokensPerSecond(); tps < 0 || tps != tps {
			return invalid("heartbeat: device %d: tokens per second %v", i, tps)
		}
		if d.GetSelected() {
			selected++
		}
	}
	if selected > 1 {
		return invalid("heartbeat: %d devices selected, at most one", selected)
	}
	return nil
}

// RoleString is the short lower-case name of a role ("expert").
func RoleString(r Role) string {
	return strings.ToLower(strings.TrimPrefix(r.String(), "ROLE_"))
}

// ParseRole is the inverse of RoleString.
func ParseRole(s string) (Role, error) {
	v, ok := Role_value["ROLE_"+strings.ToUpper(s)]
	if !ok || Role(v) == Role_ROLE_UNSPECIFIED {
		return 0, fmt.Errorf("unknown role %q (want one of %s)", s, strings.Join(RoleNames(), ", "))
	}
	return Role(v), nil
}

// RoleNames lists the valid role names in enum order.
func RoleNames() []string {
	var out []string
	for i := int32(1); ; i++ {
		if _, ok := Role_name[i]; !ok {
			return out
		}
		out = append(out, RoleString(Role(i)))
	}
}

// Validate checks a decoded Manifest: format, parameters, one well-formed
// shard per (layer, expert) in order, and CIDv1 raw sha2-256 CIDs.
func (m *Manifest) Validate() error {
	if m == nil {
		return invalid("manifest: nil")
	}
	if f := m.GetFormat(); f != 1 && f != 2 {
		return invalid("manifest: format %d, want 1 or 2", f)
	}
	p := m.GetParams()
	if p == nil || p.GetLayers() == 0 || p.GetExperts() == 0 || p.GetExpertsUsed() == 0 ||
		p.GetExpertsUsed() > p.GetExperts() || p.GetEmbd() == 0 || p.GetHeads() == 0 {
		return invalid("manifest: params %v", p)
	}
	if p.GetDenseLead() >= p.GetLayers() {
		return invalid("manifest: %d dense leading layers of %d", p.GetDenseLead(), p.GetLayers())
	}
	moe := uint64(p.GetLayers() - p.GetDenseLead())
	if moe*uint64(p.GetExperts()) != uint64(len(m.GetExperts())) {
		return invalid("manifest: %d expert shards, want MoE layers x experts = %d", len(m.GetExperts()), moe*uint64(p.GetExperts()))
	}
	if err := m.GetGating().validate("gating"); err != nil {
		return err
	}
	for i, e := range m.GetExperts() {
		wantL, wantE := p.GetDenseLead()+uint32(i)/p.GetExperts(), uint32(i)%p.GetExperts()
		if e.GetLayer() != wantL || e.GetExpert() != wantE {
			return invalid("manifest: experts[%d] is %d:%d, want %d:%d", i, e.GetLayer(), e.GetExpert(), wantL, wantE)
		}
		if err := e.GetShard().validate(fmt.Sprintf("expert %d:%d", wantL, wantE)); err != nil {
			return err
		}
	}
	if n := len(m.GetShared()); n != 0 && uint64(n) != moe {
		return invalid("manifest: %d shared expert shards, want one per MoE layer (%d) or none", n, moe)
	}
	for i, e := range m.GetShared() {
		wantL := p.GetDenseLead() + uint32(i)
		if e.GetLayer() != wantL || e.GetExpert() != p.GetExperts() {
			return invalid("manifest: shared[%d] is %d:%d, want %d:%d", i, e.GetLayer(), e.GetExpert(), wantL, p.GetExperts())
		}
		if err := e.GetShard().validate(fmt.Sprintf("shared expert %d:%d", wantL, p.GetExperts())); err != nil {
			return err
		}
	}
	if len(m.GetTensorOrder()) == 0 {
		return invalid("manifest: empty tensor order")
	}
	return m.validateLayers()
}

// validateLayers checks format 2's head and layer shards (format 1 has
// none).
func (m *Manifest) validateLayers() error {
	if m.GetFormat() == 1 {
		if m.GetHead() != nil || len(m.GetLayers()) != 0 {
			return invalid("manifest: format 1 with layer shards")
		}
		return nil
	}
	if err := m.GetHead().validate("head"); err != nil {
		return err
	}
	if n, want := len(m.GetLayers()), m.GetParams().GetLayers(); uint64(n) != uint64(want) {
		return invalid("manifest: %d layer shards, want one per layer (%d)", n, want)
	}
	for i, l := range m.GetLayers() {
		if l.GetLayer() != uint32(i) {
			return invalid("manifest: layers[%d] is layer %d", i, l.GetLayer())
		}
		if err := l.GetShard().validate(fmt.Sprintf("layer %d", i)); err != nil {
			return err
		}
	}
	return nil
}

// LayerRef is layer l's shard entry, or nil when the manifest has none
// (format 1, or l out of range).
func (m *Manifest) LayerRef(l int) *ShardRef {
	if l < 0 || l >= len(m.GetLayers()) {
		return nil
	}
	return m.GetLayers()[l].GetShard()
}

func (s *ShardRef) validate(what string) error {
	if s == nil {
		return invalid("manifest: %s: no shard", what)
	}
	c, err := cid.Cast(s.GetCid())
	if err != nil {
		return invalid("manifest: %s: cid: %v", what, err)
	}
	if c.Version() != 1 || c.Type() != cid.Raw || c.Prefix().MhType != multihash.SHA2_256 {
		return invalid("manifest: %s: cid %s is not CIDv1 raw sha2-256", what, c)
	}
	if s.GetSize() == 0 || len(s.GetTensors()) == 0 {
		return invalid("manifest: %s: empty shard", what)
	}
	for _, t := range s.GetTensors() {
		if t.GetName() == "" || len(t.GetShape()) == 0 || len(t.GetShape()) > 4 {
			return invalid("manifest: %s: tensor %q shape %v", what, t.GetName(), t.GetShape())
		}
	}
	return nil
}

// Rows returns the tensor's row count and width after checking that its
// data holds exactly rows x cols values of its dtype.
func (t *Tensor) Rows() (rows, cols int, err error) {
	if t == nil {
		return 0, 0, invalid("tensor: missing")
	}
	if len(t.GetShape()) != 2 {
		return 0, 0, invalid("tensor: shape %v, want [rows, cols]", t.GetShape())
	}
	rows, cols = int(t.GetShape()[0]), int(t.GetShape()[1])
	if rows < 1 || cols < 1 || cols > MaxEmbd || rows > MaxExpertTokens {
		return 0, 0, invalid("tensor: shape %v out of range", t.GetShape())
	}
	var size int
	switch t.GetDtype() {
	case WireDType_WIRE_DTYPE_F32:
		size = 4
	case WireDType_WIRE_DTYPE_F16:
		size = 2
	default:
		return 0, 0, invalid("tensor: dtype %v", t.GetDtype())
	}
	if len(t.GetData()) != rows*cols*size {
		return 0, 0, invalid("tensor: %d bytes, want %d for %v %v", len(t.GetData()), rows*cols*size, t.GetDtype(), t.GetShape())
	}
	return rows, cols, nil
}

// Validate checks an ExpertRequest's fields (not whether the model or
// expert is hosted).
func (r *ExpertRequest) Validate() error {
	if err := r.validate(); err != nil {
		return err
	}
	g := r.GetGroup()
	if len(g) == 0 {
		return nil
	}
	if len(g)+1 > MaxGroup {
		return invalid("expert request: a group of %d experts, at most %d", len(g)+1, MaxGroup)
	}
	seen := map[uint32]bool{r.GetExpert(): true}
	ids := map[uint64]bool{r.GetRequestId(): true}
	for i, m := range g {
		if err := m.validate(); err != nil {
			return fmt.Errorf("group member %d: %w", i, err)
		}
		switch {
		case len(m.GetGroup()) > 0:
			return invalid("expert request: group member %d holds a group", i)
		case !bytes.Equal(m.GetModel(), r.GetModel()) || m.GetLayer() != r.GetLayer():
			return invalid("expert request: group member %d asks layer %d of another model or layer than %d", i, m.GetLayer(), r.GetLayer())
		case seen[m.GetExpert()]:
			return invalid("expert request: expert %d twice in one group", m.GetExpert())
		case ids[m.GetRequestId()]:
			return invalid("expert request: request id %d twice in one group", m.GetRequestId())
		}
		seen[m.GetExpert()], ids[m.GetRequestId()] = true, true
	}
	return nil
}

// validate checks one request of a group (or one alone), not its members.
func (r *ExpertRequest) validate() error {
	if n := len(r.GetDelegations()); n > MaxDelegations {
		return invalid("expert request: %d delegations, at most %d", n, MaxDelegations)
	}
	if r == nil {
		return invalid("expert request: nil")
	}
	if _, err := cid.Cast(r.GetModel()); err != nil {
		return invalid("expert request: model cid: %v", err)
	}
	if r.GetGroupRows() != nil || len(r.GetRowIndex()) > 0 {
		// A group's are expanded (UnshareRows) before it is validated.
		return invalid("expert request: shared rows outside a group")
	}
	rows, _, err := r.GetHidden().Rows()
	if err != nil {
		return fmt.Errorf("expert request: hidden: %w", err)
	}
	if segs := r.GetSegments(); len(segs) > 0 {
		if len(segs) > MaxSegments {
			return invalid("expert request: %d segments, at most %d", len(segs), MaxSegments)
		}
		if r.GetEscrow() != 0 {
			return invalid("expert request: escrow %d with segments (each segment names its own)", r.GetEscrow())
		}
		sum := 0
		for i, s := range segs {
			if s.GetRows() == 0 {
				return invalid("expert request: segment %d has no rows", i)
			}
			sum += int(s.GetRows())
		}
		if sum != rows {
			return invalid("expert request: segments hold %d rows, hidden has %d", sum, rows)
		}
	}
	return nil
}

// Validate checks a decoded InferRequest: a model CID, exactly one of
// prompt and messages, and sampling values in range. It does not check
// the prompt against a model's context; the gating node does.
func (r *InferRequest) Validate() error {
	if r == nil {
		return invalid("infer request: nil")
	}
	if _, err := cid.Cast(r.GetModel()); err != nil {
		return invalid("infer request: model cid: %v", err)
	}
	switch {
	case r.GetPrompt() == "" && len(r.GetMessages()) == 0:
		return invalid("infer request: empty prompt (set prompt or messages)")
	case r.GetPrompt() != "" && len(r.GetMessages()) > 0:
		return invalid("infer request: both prompt and messages are set")
	case len(r.GetMessages()) > MaxChatMessages:
		return invalid("infer request: %d messages, at most %d", len(r.GetMessages()), MaxChatMessages)
	}
	for i, m := range r.GetMessages() {
		switch m.GetRole() {
		case "system", "user", "assistant":
		default:
			return invalid("infer request: messages[%d]: role %q (want system, user or assistant)", i, m.GetRole())
		}
	}
	s := r.GetSampling()
	switch t := s.GetTemperature(); {
	case t != t || t < 0 || t > 100: // t != t: NaN
		return invalid("infer request: temperature %v outside [0, 100]", t)
	}
	if p := s.GetTopP(); p != p || p < 0 || p > 1 {
		return invalid("infer request: top_p %v outside [0, 1]", p)
	}
	if s.GetMaxTokens() > MaxGenerateTokens {
		return invalid("infer request: max_tokens %d, at most %d", s.GetMaxTokens(), MaxGenerateTokens)
	}
	if len(s.GetStop()) > MaxStopStrings {
		return invalid("infer request: %d stop strings, at most %d", len(s.GetStop()), MaxStopStrings)
	}
	for i, st := range s.GetStop() {
		if st == "" || len(st) > MaxStopLen {
			return invalid("infer request: stop[%d] is %d bytes (want 1 to %d)", i, len(st), MaxStopLen)
		}
	}
	return nil
}

// FloatsDigest is the SHA-256 of x as little-endian F32: the digest of
// hidden states in usage receipts and verdicts.
func FloatsDigest(x []float32) []byte {
	if littleEndian {
		// The floats' own bytes are the digest's input: no copy (a
		// receipt digests every call's rows and answer).
		d := sha256.Sum256(floatBytes(x))
		return d[:]
	}
	var h FloatsHash
	h.Write(x)
	return h.Sum()
}

// littleEndian: this machine keeps a float32's bytes as FloatsDigest
// reads them.
var littleEndian = binary.NativeEndian.Uint32([]byte{1, 0, 0, 0}) == 1

// floatBytes is x's memory as bytes (on a little-endian machine, x as
// little-endian F32).
func floatBytes(x []float32) []byte {
	if len(x) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(x))), 4*len(x))
}

// FloatsHash computes FloatsDigest over floats given a run at a time (a
// tensor widened block by block, without a copy of the whole). The zero
// value is ready to use.
type FloatsHash struct {
	h   hash.Hash
	buf [4096]byte
}

// Write adds x to the hash.
func (f *FloatsHash) Write(x []float32) {
	if f.h == nil {
		f.h = sha256.New()
	}
	if littleEndian {
		f.h.Write(floatBytes(x))
		return
	}
	for len(x) > 0 {
		n := min(len(x), len(f.buf)/4)
		for i, v := range x[:n] {
			binary.LittleEndian.PutUint32(f.buf[4*i:], math.Float32bits(v))
		}
		f.h.Write(f.buf[:4*n])
		x = x[n:]
	}
}

// Sum is the digest of the floats written.
func (f *FloatsHash) Sum() []byte {
	if f.h == nil {
		f.h = sha256.New()
	}
	return f.h.Sum(nil)
}

// MoELayers are the layers with experts: [first, end). Leading layers may
// be dense (ModelParams.dense_lead).
func (m *Manifest) MoELayers() (first, end int) {
	return int(m.GetParams().GetDenseLead()), int(m.GetParams().GetLayers())
}

// ExpertFLOPsPerToken is the expert work of one token of the model, as
// expert nodes count it in their receipts: three matrix products of embd
// x ff for each expert used in each MoE layer.
func (m *Manifest) ExpertFLOPsPerToken() uint64 {
	first, end := m.MoELayers()
	p := m.GetParams()
	flops := 6 * uint64(p.GetEmbd()) * uint64(p.GetFf()) * uint64(p.GetExpertsUsed()) * uint64(max(0, end-first))
	for _, sh := range m.GetShared() { // remote shared experts are expert work too
		if ts := sh.GetShard().GetTensors(); len(ts) > 0 && len(ts[0].GetShape()) == 2 {
			flops += 6 * ts[0].GetShape()[0] * ts[0].GetShape()[1]
		}
	}
	return flops
}

// LayerFLOPsPerToken is the work of one token through layers [first,
// end) outside their routed experts — attention, norms, router, a dense
// layer's feed-forward, a shared expert the layer shard holds — as a span
// node counts it in its receipts: a multiply and an add for each weight
// of the layer shards' matrices (the attention over the context, which
// grows with the position, is not counted). 0 for a manifest without
// layer shards.
func (m *Manifest) LayerFLOPsPerToken(first, end int) uint64 {
	var flops uint64
	for l := max(first, 0); l < end; l++ {
		for _, t := range m.LayerRef(l).GetTensors() {
			if sh := t.GetShape(); len(sh) == 2 {
				flops += 2 * sh[0] * sh[1]
			}
		}
	}
	return flops
}

// ExpertsPerLayer is how many experts a MoE layer has on the network: the
// routed ones, and the shared one when it is hosted (SharedExpert).
func (m *Manifest) ExpertsPerLayer() int {
	n := int(m.GetParams().GetExperts())
	if len(m.GetShared()) > 0 {
		n++
	}
	return n
}

// SharedExpert is the expert number of a MoE layer's hosted shared expert
// (params.experts), or -1 when the shared experts are in the gating shard
// or the model has none.
func (m *Manifest) SharedExpert() int {
	if len(m.GetShared()) == 0 {
		return -1
	}
	return int(m.GetParams().GetExperts())
}

// AllExperts lists every hosted expert's entry: the routed ones, then the
// shared ones.
func (m *Manifest) AllExperts() []*ExpertShardRef {
	if len(m.GetShared()) == 0 {
		return m.GetExperts()
	}
	return append(append([]*ExpertShardRef(nil), m.GetExperts()...), m.GetShared()...)
}

// ExpertRef is expert (layer, expert)'s entry, or nil when the model has
// no such expert (a dense leading layer, or out of range). Expert
// params.experts is the layer's hosted shared expert, if any.
func (m *Manifest) ExpertRef(layer, expert int) *ExpertShardRef {
	first, end := m.MoELayers()
	per := int(m.GetParams().GetExperts())
	if layer < first || layer >= end || expert < 0 || expert >= m.ExpertsPerLayer() {
		return nil
	}
	if expert == per {
		if i := layer - first; i < len(m.GetShared()) {
			return m.GetShared()[i]
		}
		return nil
	}
	if i := (layer-first)*per + expert; i < len(m.GetExperts()) {
		return m.GetExperts()[i]
	}
	return nil
}

// Validate checks a decoded SpanRequest: a model CID, a non-empty range of
// layers, a session name, and (unless it closes the session) F32 rows.
func (r *SpanRequest) Validate() error {
	if r == nil {
		return invalid("span request: nil")
	}
	if _, err := cid.Cast(r.GetModel()); err != nil {
		return invalid("span request: model cid: %v", err)
	}
	if r.GetFirst() >= r.GetEnd() {
		return invalid("span request: layers [%d, %d)", r.GetFirst(), r.GetEnd())
	}
	if len(r.GetSession()) != SessionIDLen {
		return invalid("span request: a session name of %d bytes, want %d", len(r.GetSession()), SessionIDLen)
	}
	if r.GetWant() < SpanWant_SPAN_WANT_ALL || r.GetWant() > SpanWant_SPAN_WANT_EACH {
		return invalid("span request: want %d", r.GetWant())
	}
	if r.GetClose() || r.GetSync() {
		if r.GetHidden() != nil {
			return invalid("span request: a close or sync with rows")
		}
		if r.GetClose() && r.GetSync() {
			return invalid("span request: both close and sync")
		}
		return nil
	}
	if r.GetHidden().GetDtype() != WireDType_WIRE_DTYPE_F32 {
		return invalid("span request: hidden states in %s, want F32", r.GetHidden().GetDtype())
	}
	if _, _, err := r.GetHidden().Rows(); err != nil {
		return fmt.Errorf("span request: hidden: %w", err)
	}
	return nil
}

// SpanChain is the digest of the rows a session has sent a span, in
// order: the chain of no rows is SHA-256("neuro/span-chain/v1"), and each
// row (embd F32, little-endian) extends it to SHA-256(chain ‖ row). A
// span node keeps the chain at every position of a session's cache, so
// that a rewind cuts it where it cuts the cache; its receipt for a request
// signs SpanRequestDigest of the chains before and after the request's
// rows, which binds the answer to every row the session sent up to it.
type SpanChain [sha256.Size]byte

// SpanChainStart is the chain of no rows.
func SpanChainStart() SpanChain {
	return sha256.Sum256([]byte("neuro/span-chain/v1"))
}

// Next returns the chain after the rows of x (row-major, embd floats a
// row), one row at a time. embd must divide len(x).
func (c SpanChain) Next(x []float32, embd int) SpanChain {
	if embd <= 0 {
		return c
	}
	buf := make([]byte, 4*len(x))
	for i, v := range x {
		binary.LittleEndian.PutUint32(buf[4*i:], math.Float32bits(v))
	}
	return c.NextRow(buf, 4*embd)
}

// NextRow returns the chain after the rows of data, little-endian F32 rows
// of rowBytes each (an F32 wire tensor's data, hashed as it came).
func (c SpanChain) NextRow(data []byte, rowBytes int) SpanChain {
	if rowBytes <= 0 {
		return c
	}
	h := sha256.New()
	for ; len(data) >= rowBytes; data = data[rowBytes:] {
		h.Reset()
		h.Write(c[:])
		h.Write(data[:rowBytes])
		h.Sum(c[:0])
	}
	return c
}

// SpanRequestDigest is the input digest of a span request (in its
// receipt and in a span verdict): prior is the chain of the rows the
// session sent before it, after the chain once the request's rows are
// added (prior.Next of them), want what it kept. The rows are hashed
// once, in the chain a span node keeps anyway.
func SpanRequestDigest(prior SpanChain, want SpanWant, after SpanChain) []byte {
	h := sha256.New()
	h.Write([]byte("neuro/span-request/v2"))
	h.Write(prior[:])
	var w [4]byte
	binary.LittleEndian.PutUint32(w[:], uint32(want))
	h.Write(w[:])
	h.Write(after[:])
	return h.Sum(nil)
}
