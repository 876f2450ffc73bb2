package neuropb

import (
	"bytes"
	"hash/maphash"
)

// A group's shared rows (ExpertProtocol 1.2.0, ExpertRequest.group_rows):
// in a decode step a token's hidden state goes to each of the experts it
// is routed to, so a group of a layer's experts on one node carried the
// same row once for each of them (top-k copies: 8 for Qwen3's experts).
// ShareRows sends each distinct row once; UnshareRows gives every request
// back its own hidden, byte for byte, before anything else reads it.

// rowSeed seeds the hash that finds equal rows (any seed does: equal rows
// are compared byte by byte).
var rowSeed = maphash.MakeSeed()

// ShareRows rewrites a group (reqs[0] the top request, reqs[1:] its
// members; each with its own hidden, of one dtype and width) so that its
// distinct rows travel once: reqs[0].group_rows holds them and each
// request gives its rows as row_index, its hidden unset. Rows are equal
// when their bytes are, whichever token they came from, so the expanded
// requests are exactly the originals. It changes nothing and returns nil
// when the group has fewer than two requests, its hiddens differ in dtype
// or width, or no row repeats (nothing to save). Otherwise it returns the
// requests' hiddens, for RestoreRows once the message is written.
func ShareRows(reqs []*ExpertRequest) []*Tensor {
	if len(reqs) < 2 {
		return nil
	}
	first := reqs[0].GetHidden()
	_, cols, err := first.Rows()
	if err != nil {
		return nil
	}
	total := 0
	for _, r := range reqs {
		h := r.GetHidden()
		n, c, err := h.Rows()
		if err != nil || c != cols || h.GetDtype() != first.GetDtype() || r.GetGroupRows() != nil || len(r.GetRowIndex()) > 0 {
			return nil
		}
		total += n
	}
	rowBytes := len(first.GetData()) / int(first.GetShape()[0])
	var (
		table  []byte
		seen   = make(map[uint64][]uint32, total) // a row's hash: the table's rows with it
		stored uint32
		index  = make([][]uint32, len(reqs))
	)
	for i, r := range reqs {
		data := r.GetHidden().GetData()
		idx := make([]uint32, 0, len(data)/rowBytes)
		for off := 0; off < len(data); off += rowBytes {
			row := data[off : off+rowBytes]
			h := maphash.Bytes(rowSeed, row)
			at, found := uint32(0), false
			for _, k := range seen[h] {
				if bytes.Equal(table[int(k)*rowBytes:int(k+1)*rowBytes], row) {
					at, found = k, true
					break
				}
			}
			if !found {
				table = append(table, row...)
				seen[h] = append(seen[h], stored)
				at = stored
				stored++
			}
			idx = append(idx, at)
		}
		index[i] = idx
	}
	if int(stored) == total {
		return nil
	}
	saved := make([]*Tensor, len(reqs))
	for i, r := range reqs {
		saved[i] = r.Hidden
		r.Hidden, r.RowIndex = nil, index[i]
	}
	reqs[0].GroupRows = &Tensor{Data: table, Dtype: first.GetDtype(), Shape: []uint32{stored, uint32(cols)}}
	return saved
}

// RestoreRows undoes ShareRows on reqs with the hiddens it returned.
func RestoreRows(reqs []*ExpertRequest, saved []*Tensor) {
	if saved == nil {
		return
	}
	for i, r := range reqs {
		r.Hidden, r.RowIndex = saved[i], nil
	}
	reqs[0].GroupRows = nil
}

// UnshareRows expands a request that came with a group's shared rows (as
// read from the wire, its group still attached): each of it and its
// members gets its own hidden, its rows' bytes copied from group_rows in
// the order of its row_index, which is cleared with group_rows. A request
// without group_rows is left as it is, and must name no row_index. The
// expanded group holds at most MaxExpertMessageSize bytes of rows, as a
// message of its own hiddens could (one shared row must not multiply into
// more memory than a message may bring).
func (r *ExpertRequest) UnshareRows() error {
	if r == nil {
		return invalid("expert request: nil")
	}
	all := append([]*ExpertRequest{r}, r.GetGroup()...)
	table := r.GetGroupRows()
	if table == nil {
		for i, m := range all {
			if len(m.GetRowIndex()) > 0 || m.GetGroupRows() != nil {
				return invalid("expert request: request %d of the group names shared rows the group does not have", i)
			}
		}
		return nil
	}
	if len(r.GetGroup()) == 0 {
		return invalid("expert request: shared rows without a group")
	}
	stored, cols, err := table.Rows()
	if err != nil {
		return invalid("expert request: group rows: %v", err)
	}
	rowBytes := len(table.GetData()) / stored
	total := 0
	for i, m := range all {
		idx := m.GetRowIndex()
		switch {
		case i > 0 && m.GetGroupRows() != nil:
			return invalid("expert request: group member %d holds shared rows of its own", i-1)
		case m.GetHidden() != nil:
			return invalid("expert request: request %d of the group has both its own hidden and shared rows", i)
		case len(idx) == 0:
			return invalid("expert request: request %d of the group names no rows", i)
		case len(idx) > MaxExpertTokens:
			return invalid("expert request: request %d of the group names %d rows, at most %d", i, len(idx), MaxExpertTokens)
		}
		for _, k := range idx {
			if int(k) >= stored {
				return invalid("expert request: request %d of the group names row %d of %d", i, k, stored)
			}
		}
		if total += len(idx) * rowBytes; total > MaxExpertMessageSize {
			return invalid("expert request: the group's rows expand to more than %d bytes", MaxExpertMessageSize)
		}
	}
	data := table.GetData()
	for _, m := range all {
		idx := m.GetRowIndex()
		own := make([]byte, 0, len(idx)*rowBytes)
		for _, k := range idx {
			own = append(own, data[int(k)*rowBytes:int(k+1)*rowBytes]...)
		}
		m.Hidden = &Tensor{Data: own, Dtype: table.GetDtype(), Shape: []uint32{uint32(len(idx)), uint32(cols)}}
		m.RowIndex = nil
	}
	r.GroupRows = nil
	return nil
}
