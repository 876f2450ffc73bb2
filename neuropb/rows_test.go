package neuropb

import (
	"errors"
	"testing"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"
	"google.golang.org/protobuf/proto"
)

// rowsModel is a CID for the requests of these tests.
func rowsModel(t *testing.T) []byte {
	h, err := multihash.Sum([]byte("rows"), multihash.SHA2_256, -1)
	if err != nil {
		t.Fatal(err)
	}
	return cid.NewCidV1(cid.Raw, h).Bytes()
}

// hiddenOf is a tensor of rows, each of width cols, row i filled with
// byte v[i] (F32: 4 bytes a value).
func hiddenOf(cols int, v ...byte) *Tensor {
	data := make([]byte, 0, len(v)*cols*4)
	for _, b := range v {
		for range cols * 4 {
			data = append(data, b)
		}
	}
	return &Tensor{Data: data, Dtype: WireDType_WIRE_DTYPE_F32, Shape: []uint32{uint32(len(v)), uint32(cols)}}
}

// A decode step's group (one token to each of a layer's experts) and a
// prompt's (its tokens spread over the experts) travel with each distinct
// row once, and expand to exactly the requests they were, which validate.
func TestShareRowsRoundTrip(t *testing.T) {
	model := rowsModel(t)
	const cols = 16
	for _, c := range []struct {
		name   string
		rows   [][]byte // each request's rows (by fill byte)
		stored int
	}{
		{"decode, top-8", [][]byte{{7}, {7}, {7}, {7}, {7}, {7}, {7}, {7}}, 1},
		{"prompt", [][]byte{{1, 2, 4}, {2, 3}, {1, 3, 4, 5}}, 5},
		{"a row twice in one request", [][]byte{{1, 1}, {1}}, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			var reqs []*ExpertRequest
			for i, rows := range c.rows {
				reqs = append(reqs, &ExpertRequest{RequestId: uint64(i + 1), Model: model, Layer: 3, Expert: uint32(i), Hidden: hiddenOf(cols, rows...)})
			}
			want := make([]*ExpertRequest, len(reqs))
			total := 0
			for i, r := range reqs {
				want[i] = proto.Clone(r).(*ExpertRequest)
				total += len(c.rows[i])
			}
			reqs[0].Group = reqs[1:]
			plain, err := proto.Marshal(reqs[0])
			if err != nil {
				t.Fatal(err)
			}
			reqs[0].Group = nil
			saved := ShareRows(reqs)
			if saved == nil {
				t.Fatal("nothing shared")
			}
			top := reqs[0]
			if n, _, err := top.GetGroupRows().Rows(); err != nil || n != c.stored {
				t.Fatalf("group rows: %d (%v), want %d", n, err, c.stored)
			}
			for _, r := range reqs {
				if r.GetHidden() != nil || len(r.GetRowIndex()) == 0 {
					t.Fatalf("request %d after sharing: hidden %v, rows %v", r.GetRequestId(), r.GetHidden() != nil, r.GetRowIndex())
				}
			}
			// On the wire, then read back as the node does.
			top.Group = reqs[1:]
			wire, err := proto.Marshal(top)
			if err != nil {
				t.Fatal(err)
			}
			// The repeated rows' bytes saved, less a few bytes of
			// indices and framing a request.
			if most := len(plain) - (total-c.stored)*cols*4 + 8*len(reqs); len(wire) > most {
				t.Fatalf("%d bytes on the wire, %d plain: want at most %d", len(wire), len(plain), most)
			}
			got := &ExpertRequest{}
			if err := proto.Unmarshal(wire, got); err != nil {
				t.Fatal(err)
			}
			if err := got.UnshareRows(); err != nil {
				t.Fatal(err)
			}
			if err := got.Validate(); err != nil {
				t.Fatal(err)
			}
			members := got.GetGroup()
			got.Group = nil
			for i, g := range append([]*ExpertRequest{got}, members...) {
				if !proto.Equal(g, want[i]) {
					t.Fatalf("request %d expanded:\n%v\nwant\n%v", i, g, want[i])
				}
			}
			// The sender gets its requests back as they were.
			top.Group = nil
			RestoreRows(reqs, saved)
			for i, r := range reqs {
				if !proto.Equal(r, want[i]) {
					t.Fatalf("request %d restored: %v", i, r)
				}
			}
		})
	}
}

// Nothing is shared where nothing repeats, or the rows differ in kind.
func TestShareRowsLeavesWhatItCannotShare(t *testing.T) {
	model := rowsModel(t)
	f16 := hiddenOf(8, 1)
	f16.Dtype, f16.Data = WireDType_WIRE_DTYPE_F16, f16.Data[:16]
	for _, c := range []struct {
		name string
		reqs []*ExpertRequest
	}{
		{"one request", []*ExpertRequest{{Model: model, Hidden: hiddenOf(8, 1, 1)}}},
		{"no row repeats", []*ExpertRequest{{Model: model, Hidden: hiddenOf(8, 1)}, {Model: model, Hidden: hiddenOf(8, 2)}}},
		{"widths differ", []*ExpertRequest{{Model: model, Hidden: hiddenOf(8, 1)}, {Model: model, Hidden: hiddenOf(4, 1, 1)}}},
		{"dtypes differ", []*ExpertRequest{{Model: model, Hidden: hiddenOf(8, 1)}, {Model: model, Hidden: f16}}},
		{"a request without rows", []*ExpertRequest{{Model: model, Hidden: hiddenOf(8, 1)}, {Model: model}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := make([]*ExpertRequest, len(c.reqs))
			for i, r := range c.reqs {
				before[i] = proto.Clone(r).(*ExpertRequest)
			}
			if ShareRows(c.reqs) != nil {
				t.Fatal("shared")
			}
			for i, r := range c.reqs {
				if !proto.Equal(r, before[i]) {
					t.Fatalf("request %d changed: %v", i, r)
				}
			}
		})
	}
}

// A node refuses shared rows it cannot expand as the protocol says, and
// one shared row never expands beyond what a message could hold.
func TestUnshareRowsRefuses(t *testing.T) {
	model := rowsModel(t)
	table := hiddenOf(8, 1, 2)
	member := func(idx ...uint32) *ExpertRequest {
		return &ExpertRequest{RequestId: 2, Model: model, Expert: 1, RowIndex: idx}
	}
	big := make([]uint32, MaxExpertTokens)
	wide := hiddenOf(MaxEmbd, 1) // one row of the widest hidden
	var many []*ExpertRequest
	for e := range MaxGroup - 1 {
		many = append(many, &ExpertRequest{RequestId: uint64(e + 2), Model: model, Expert: uint32(e + 1), RowIndex: big})
	}
	for _, c := range []struct {
		name string
		req  *ExpertRequest
	}{
		{"row_index without group_rows", &ExpertRequest{Model: model, Hidden: hiddenOf(8, 1), RowIndex: []uint32{0}}},
		{"a member's row_index without group_rows", &ExpertRequest{Model: model, Hidden: hiddenOf(8, 1), Group: []*ExpertRequest{member(0)}}},
		{"group_rows without a group", &ExpertRequest{Model: model, GroupRows: table, RowIndex: []uint32{0}}},
		{"a bad table", &ExpertRequest{Model: model, GroupRows: &Tensor{Data: make([]byte, 5), Dtype: WireDType_WIRE_DTYPE_F32, Shape: []uint32{2, 8}},
			RowIndex: []uint32{0}, Group: []*ExpertRequest{member(1)}}},
		{"a row beyond the table", &ExpertRequest{Model: model, GroupRows: table, RowIndex: []uint32{0}, Group: []*ExpertRequest{member(2)}}},
		{"hidden and row_index", &ExpertRequest{Model: model, GroupRows: table, RowIndex: []uint32{0}, Hidden: hiddenOf(8, 1),
			Group: []*ExpertRequest{member(1)}}},
		{"a request without rows", &ExpertRequest{Model: model, GroupRows: table, Group: []*ExpertRequest{member(1)}}},
		{"a member with a table", &ExpertRequest{Model: model, GroupRows: table, RowIndex: []uint32{0},
			Group: []*ExpertRequest{{Model: model, Expert: 1, RowIndex: []uint32{1}, GroupRows: table}}}},
		{"more rows than a request may have", &ExpertRequest{Model: model, GroupRows: table, RowIndex: []uint32{0},
			Group: []*ExpertRequest{member(append(big, 0)...)}}},
		{"expands beyond a message", &ExpertRequest{Model: model, GroupRows: wide, RowIndex: big, Group: many}},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := c.req.UnshareRows(); !errors.Is(err, ErrInvalid) {
				t.Fatalf("UnshareRows: %v, want ErrInvalid", err)
			}
		})
	}
	// What was not expanded does not validate either.
	r := &ExpertRequest{Model: model, Hidden: hiddenOf(8, 1), RowIndex: []uint32{0}}
	if err := r.Validate(); err == nil {
		t.Fatal("a request with row_index validated")
	}
}
