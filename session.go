package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"iter"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

// sessionStore keeps conversation transcripts in memory and in one JSON file per session
// under dir: the backend runs with store=false, so each turn resends the whole history.
// A small file under dir/responses/ names the session of each stored response and item.
type sessionStore struct {
	dir, respDir string
	ttl          time.Duration
	maxSessions  int
	maxBytes     int64
	now          func() time.Time
	budget       int64 // transcript bytes kept in memory; the least recently used idle go first

	mu       sync.Mutex
	index    map[string]*session // every live session, loaded or not
	loadedSz int64               // bytes of the transcripts in memory
}

// session is one conversation. st.mu guards its fields. data is replaced, never mutated, and
// only by the lock holder while the session has users, so the holder may read it unlocked.
type session struct {
	st       *sessionStore
	sid      string
	lock     chan struct{} // holds a token while one request owns the session; made on first use
	lastUsed time.Time     // kept on disk as the file's mtime, so start-up needs no reads
	users    int           // lock holder plus waiters; idle when 0
	onDisk   bool          // a committed file exists
	counts   *sessionInfo  // list's counts, nil until the file has been read
	data     *sessionData  // nil while not loaded
	resent   bool          // this turn's input was the whole history; set by input, kept by commit
}

// sessionData is an immutable snapshot of a transcript.
type sessionData struct {
	created   time.Time
	items     []json.RawMessage
	responses map[string]int // response id → item count after that turn
	latest    string
	itemIDs   []string // ids of output items that item_reference may name (responses/ files)
	outputAt  int      // where the latest turn's output begins: calls there may await outputs
	resends   bool     // the client sends its whole history: a rewritten one replaces the transcript
}

// sessionFile is a session's file. Items come last for encodeSession.
type sessionFile struct {
	ID        string            `json:"id"`
	CreatedAt int64             `json:"created_at"`
	Latest    string            `json:"latest_response_id"`
	Responses map[string]int    `json:"responses"`
	ItemIDs   []string          `json:"item_ids,omitempty"`
	Resends   bool              `json:"resends,omitempty"`
	Items     []json.RawMessage `json:"items"`
}

// sessionInfo is what GET /codex/sessions shows about a session.
type sessionInfo struct {
	ID         string `json:"id"`
	Object     string `json:"object"`
	CreatedAt  int64  `json:"created_at"`
	LastUsedAt int64  `json:"last_used_at"`
	ExpiresAt  int64  `json:"expires_at"`
	Items      int    `json:"items"`
	Bytes      int64  `json:"bytes"`
	Responses  int    `json:"responses"`
}

// indexEntry is a file under responses/: the session of a stored response or output item,
// and where it is. Files from before 2026-12 hold only the session id.
type indexEntry struct {
	Session  string          `json:"session"`
	At       *int            `json:"at,omitempty"`       // an output item: its place in the transcript
	Input    []int           `json:"input,omitempty"`    // a response: where its input items are
	Response json.RawMessage `json:"response,omitempty"` // a response: the object the client got
}

// autoPrefix names the sessions ccproxy makes by itself: for a Responses request that named
// none, and for the branches of previous_response_id. They are evicted before named ones.
const autoPrefix = "auto-"

// newSessionStore lists only names and mtimes: files are read on first use, so start-up
// stays fast with many sessions on disk.
func newSessionStore(dir string, ttl time.Duration, maxSessions int, maxBytes int64,
	now func() time.Time) (*sessionStore, error) {
	s := &sessionStore{dir: dir, respDir: filepath.Join(dir, "responses"), ttl: ttl, maxSessions: maxSessions,
		maxBytes: maxBytes, now: now, budget: 64 << 20, index: map[string]*session{}}
	if err := os.MkdirAll(s.respDir, 0o700); err != nil {
		return nil, fmt.Errorf("create session directory: %w", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list sessions: %w", err)
	}
	for _, e := range entries {
		id, ok := strings.CutSuffix(e.Name(), ".json")
		switch {
		case ok && validSessionID(id) && e.Type().IsRegular():
			if fi, err := e.Info(); err == nil { // else removed since ReadDir
				s.index[id] = &session{st: s, sid: id, onDisk: true, lastUsed: fi.ModTime()}
			}
		case strings.Contains(e.Name(), ".json.tmp"): // a crash inside writeFileAtomic
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
	return s, nil
}

// validSessionID: 1–128 of [A-Za-z0-9._:-], not "." or "..": ids become file names.
func validSessionID(id string) bool {
	const chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-"
	return id != "" && len(id) <= 128 && id != "." && id != ".." && strings.Trim(id, chars) == ""
}

var errSessionNotFound = &apiError{kind: errNotFound, code: "session_not_found", msg: "Session not found"}

// errResponseNotFound is OpenAI's wording for an unknown previous_response_id.
func errResponseNotFound(id string) error {
	return &apiError{kind: errNotFound, param: "previous_response_id", code: "previous_response_not_found",
		msg: fmt.Sprintf("Previous response with id '%s' not found.", id)}
}

// acquire locks session id for one turn, creating it when new. It waits while another
// request holds the session and gives up with ctx.Err() when ctx ends.
func (s *sessionStore) acquire(ctx context.Context, id string) (*session, error) {
	if !validSessionID(id) {
		return nil, invalid("session_id",
			"invalid session id %q: use 1-128 characters from A-Z a-z 0-9 . _ : -", id)
	}
	ss, err := s.enter(id, true)
	if err == nil {
		err = ss.lockAndLoad(ctx)
	}
	if err != nil {
		return nil, err
	}
	return ss, nil
}

// acquireResponse locks the session of previous_response_id respID. If respID is its latest
// response the session continues; otherwise (a branch) a new session is forked whose
// transcript is the history up to and including that response.
func (s *sessionStore) acquireResponse(ctx context.Context, respID string) (*session, error) {
	e, err := s.entry(respID)
	if errors.Is(err, fs.ErrNotExist) || err == nil && e.At != nil {
		return nil, errResponseNotFound(respID)
	} else if err != nil {
		return nil, err
	}
	ss, err := s.enter(e.Session, false)
	if err != nil {
		return nil, errResponseNotFound(respID)
	}
	if err := ss.lockAndLoad(ctx); err != nil {
		return nil, err
	}
	n, ok := ss.data.responses[respID]
	if ok && respID == ss.data.latest {
		return ss, nil
	}
	defer ss.release()
	if !ok { // the index file outlived its session (deleted and recreated)
		return nil, errResponseNotFound(respID)
	}
	fork, err := s.acquire(ctx, autoPrefix+rand.Text())
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	// Snapshots are immutable, so the fork can share the items.
	s.setDataLocked(fork, &sessionData{created: fork.data.created, items: ss.data.items[:n:n],
		responses: map[string]int{}})
	return fork, nil
}

// entry reads the index file of a response or item id; the error wraps fs.ErrNotExist when
// there is none.
func (s *sessionStore) entry(id string) (indexEntry, error) {
	var e indexEntry
	if !validSessionID(id) {
		return e, fs.ErrNotExist
	}
	b, err := os.ReadFile(filepath.Join(s.respDir, id))
	switch {
	case err != nil:
		return e, fmt.Errorf("read response index: %w", err)
	case len(b) > 0 && b[0] == '{':
		err = json.Unmarshal(b, &e)
	default:
		e.Session = string(b)
	}
	return e, err
}

// stored returns a stored response's entry and its session's transcript.
func (s *sessionStore) stored(id string) (indexEntry, []json.RawMessage, error) {
	e, err := s.entry(id)
	if errors.Is(err, fs.ErrNotExist) || err == nil && e.Response == nil {
		err = &apiError{kind: errNotFound, code: "not_found",
			msg: fmt.Sprintf("Response with id '%s' not found.", id)}
	}
	var items []json.RawMessage
	if err == nil {
		_, items, err = s.get(e.Session)
	}
	if len(e.Input) == 2 && (e.Input[0] < 0 || e.Input[1] > len(items) || e.Input[0] > e.Input[1]) {
		e.Input = nil // the session was replaced since
	}
	return e, items, err
}

func (s *sessionStore) deleteResponse(id string) error {
	if _, _, err := s.stored(id); err != nil {
		return err
	}
	return os.Remove(filepath.Join(s.respDir, id))
}

// expand replaces the item_reference items of a turn's input with the stored items they
// name, encrypted reasoning included; an unknown id is OpenAI's 404. Each session is read
// once: a client may name every earlier item, and an unloaded transcript is read from disk.
func (s *sessionStore) expand(items []json.RawMessage) ([]json.RawMessage, error) {
	var out []json.RawMessage
	transcripts := map[string][]json.RawMessage{}
	for i, it := range items {
		var ref struct{ Type, ID string }
		if !bytes.Contains(it, []byte(`"item_reference"`)) || json.Unmarshal(it, &ref) != nil ||
			ref.Type != "item_reference" {
			out = append(out, it)
			continue
		}
		e, err := s.entry(ref.ID)
		stored, read := transcripts[e.Session]
		if err == nil && e.At != nil && !read {
			_, stored, err = s.get(e.Session)
			transcripts[e.Session] = stored
		}
		if err != nil || e.At == nil || *e.At >= len(stored) {
			return nil, &apiError{kind: errNotFound, code: "item_not_found",
				param: fmt.Sprintf("input[%d]", i), msg: fmt.Sprintf("Item with id '%s' not found.", ref.ID)}
		}
		out = append(out, stored[*e.At])
	}
	return out, nil
}

// liveLocked returns session id, or nil when there is none; an idle session past its
// ttl is removed first. With committed, a missing or never committed session is the 404.
func (s *sessionStore) liveLocked(id string, committed bool) (*session, error) {
	ss := s.index[id]
	if ss != nil && ss.users == 0 && s.ttl > 0 && s.now().Sub(ss.lastUsed) > s.ttl {
		if err := s.removeLocked(ss); err != nil {
			return nil, err
		}
		ss = nil
	}
	if committed && (ss == nil || !ss.onDisk) {
		return nil, errSessionNotFound
	}
	return ss, nil
}

// enter finds (or, with create, makes) session id and counts the caller as a user, so
// that it is neither evicted nor expired while waiting for the lock. Making one beyond
// maxSessions evicts the oldest idle session; when every session is busy it is a 429.
func (s *sessionStore) enter(id string, create bool) (*session, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ss, err := s.liveLocked(id, false)
	if err != nil {
		return nil, err
	}
	if ss == nil {
		if !create {
			return nil, errSessionNotFound
		}
		for s.maxSessions > 0 && len(s.index) >= s.maxSessions {
			// Automatic sessions go first; a named one only ever makes room for another named one.
			oldest := s.oldestIdleLocked(false, true)
			if oldest == nil && !strings.HasPrefix(id, autoPrefix) {
				oldest = s.oldestIdleLocked(false, false)
			}
			if oldest == nil {
				return nil, &apiError{kind: errLimited, code: "too_many_sessions", msg: fmt.Sprintf(
					"All %d sessions are busy; delete sessions with DELETE /codex/sessions/{id} "+
						"or raise --max-sessions", s.maxSessions)}
			}
			if err := s.removeLocked(oldest); err != nil {
				return nil, err
			}
		}
		ss = &session{st: s, sid: id}
		s.index[id] = ss
		s.setDataLocked(ss, &sessionData{created: s.now(), responses: map[string]int{}})
	}
	if ss.lock == nil {
		ss.lock = make(chan struct{}, 1)
	}
	ss.users++
	ss.lastUsed = s.now()
	return ss, nil
}

// oldestIdleLocked returns the least recently used idle session (only among those with a
// transcript in memory, with loaded, and only automatic ones, with auto), or nil.
func (s *sessionStore) oldestIdleLocked(loaded, auto bool) *session {
	var oldest *session
	for _, c := range s.index {
		if c.users == 0 && (!loaded || c.data != nil) && (!auto || strings.HasPrefix(c.sid, autoPrefix)) &&
			(oldest == nil || c.lastUsed.Before(oldest.lastUsed)) {
			oldest = c
		}
	}
	return oldest
}

// removeLocked deletes an idle session's file and its index files. Cleaning the index is
// best effort: a leftover entry names a session that no longer lists it, hence unknown.
func (s *sessionStore) removeLocked(ss *session) error {
	d := ss.data
	if d == nil && ss.onDisk {
		d, _ = s.read(ss.sid)
	}
	if d != nil {
		for _, r := range slices.Concat(slices.Collect(maps.Keys(d.responses)), d.itemIDs) {
			// A recreated session may share ids: only drop entries that still point here.
			if e, err := s.entry(r); err == nil && e.Session == ss.sid {
				os.Remove(filepath.Join(s.respDir, r))
			}
		}
	}
	if err := os.Remove(s.path(ss.sid)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove session: %w", err)
	}
	delete(s.index, ss.sid)
	s.setDataLocked(ss, nil)
	return nil
}

// setDataLocked installs transcript d, or unloads it with nil, and keeps the budget's books.
func (s *sessionStore) setDataLocked(ss *session, d *sessionData) {
	if ss.data != nil {
		s.loadedSz -= sizeOf(ss.data.items)
	}
	if ss.data = d; d != nil {
		ss.counts = d.counts()
		s.loadedSz += ss.counts.Bytes
	}
}

func (s *sessionStore) path(id string) string { return filepath.Join(s.dir, id+".json") }

// lockAndLoad waits for the session's lock and reads its file if it is not in memory; on
// failure the caller's claim is given back.
func (ss *session) lockAndLoad(ctx context.Context) error {
	select {
	case ss.lock <- struct{}{}:
	case <-ctx.Done():
		ss.leave()
		return ctx.Err()
	}
	if ss.data != nil {
		return nil
	}
	s := ss.st
	d, err := s.read(ss.sid)
	if err != nil {
		ss.release()
		return err
	}
	s.mu.Lock()
	s.setDataLocked(ss, d)
	s.mu.Unlock()
	return nil
}

func (ss *session) id() string { return ss.sid }

// input returns the upstream input for a turn: the transcript followed by incoming, or
// incoming alone when it starts with the transcript (a client resending its history).
func (ss *session) input(incoming []json.RawMessage) ([]json.RawMessage, error) {
	if ss == nil { // a request without a session
		return incoming, nil
	}
	stored := ss.data.items
	out := incoming
	// A client that resent its history and now sends one that diverges has rewritten it (the
	// Codex CLI after compacting, codex-rs/core/src/compact.rs): it replaces the transcript.
	ss.resent = len(stored) > 0 && hasPrefix(incoming, stored)
	if !ss.resent && !ss.data.resends {
		out = slices.Concat(stored, incoming)
	}
	out = closeCalls(out, min(ss.data.outputAt, len(stored)))
	if n := sizeOf(out); ss.st.maxBytes > 0 && n > ss.st.maxBytes {
		return nil, &apiError{kind: errTooLarge, code: "session_too_large", msg: fmt.Sprintf(
			"Session '%s' would grow to %d bytes, over the limit of %d; delete it with "+
				"DELETE /codex/sessions/%s or start a new session", ss.sid, n, ss.st.maxBytes, ss.sid)}
	}
	return out, nil
}

// commit makes the transcript sent (what input returned) + output, and maps responseID to
// it. The index files go first, unsynced: if one is lost or torn, a lookup finds a session
// that does not list it, a 404. The transcript is written atomically. On error the index
// files are removed again, and the previous transcript stays intact in memory and on disk.
func (ss *session) commit(sent, output []json.RawMessage, responseID string, object []byte,
	inputLen int) error {
	if ss == nil {
		return nil
	}
	s := ss.st
	d := &sessionData{created: ss.data.created, responses: maps.Clone(ss.data.responses),
		itemIDs: ss.data.itemIDs, outputAt: len(sent), resends: ss.data.resends || ss.resent,
		items: append(make([]json.RawMessage, 0, len(sent)+len(output)), sent...)}
	var err error
	var written []string
	index := func(name string, e indexEntry) {
		if err == nil {
			written = append(written, filepath.Join(s.respDir, name))
			err = os.WriteFile(written[len(written)-1], marshal(e), 0o600)
		}
	}
	for _, it := range output {
		it, id := stripID(it)
		if validSessionID(id) && id != responseID {
			d.itemIDs = append(slices.Clip(d.itemIDs), id)
			index(id, indexEntry{Session: ss.sid, At: new(len(d.items))})
		}
		d.items = append(d.items, it)
	}
	// A reply without a usable id (a sparse response.completed) is still saved.
	if validSessionID(responseID) {
		d.responses[responseID], d.latest = len(d.items), responseID
		index(responseID, indexEntry{Session: ss.sid, Input: []int{len(sent) - inputLen, len(sent)},
			Response: object})
	}
	if err == nil {
		err = writeFileAtomic(s.path(ss.sid), encodeSession(ss.sid, d))
	}
	if err != nil {
		for _, p := range written {
			os.Remove(p)
		}
		err = fmt.Errorf("save session %s: %w", ss.sid, err)
		return &apiError{kind: errStorage, code: "session_not_saved", cause: err, msg: fmt.Sprintf(
			"the answer could not be saved to session %q, which still holds the previous turns (%v); "+
				"check the disk space and permissions of the sessions directory", ss.sid, err)}
	}
	// The mtime carries last use across restarts, on the injected clock.
	now := s.now()
	os.Chtimes(s.path(ss.sid), now, now)
	s.mu.Lock()
	s.setDataLocked(ss, d)
	ss.onDisk = true
	s.mu.Unlock()
	return nil
}

// release unlocks the session; a turn that never committed leaves the transcript unchanged.
func (ss *session) release() {
	if ss != nil {
		ss.leave()
		<-ss.lock
	}
}

// leave gives back a caller's claim; a session that never reached disk vanishes with its
// last user, and idle transcripts beyond the budget go.
func (ss *session) leave() {
	s := ss.st
	s.mu.Lock()
	defer s.mu.Unlock()
	ss.users--
	ss.lastUsed = s.now()
	if ss.users > 0 {
		return
	}
	if !ss.onDisk {
		if s.index[ss.sid] == ss {
			delete(s.index, ss.sid)
		}
		s.setDataLocked(ss, nil)
	}
	for s.loadedSz > s.budget {
		oldest := s.oldestIdleLocked(true, false)
		if oldest == nil {
			return
		}
		s.setDataLocked(oldest, nil)
	}
}

// list returns all live sessions, most recently used first.
func (s *sessionStore) list() ([]sessionInfo, error) {
	s.mu.Lock()
	ids := slices.Collect(maps.Keys(s.index))
	s.mu.Unlock()
	var infos []sessionInfo
	for _, id := range ids {
		info, _, err := s.describe(id, false)
		if errors.Is(err, errSessionNotFound) {
			continue // gone since, or never committed
		} else if err != nil {
			return nil, err
		}
		infos = append(infos, info)
	}
	slices.SortFunc(infos, func(a, b sessionInfo) int { return cmp.Compare(b.LastUsedAt, a.LastUsedAt) })
	return infos, nil
}

// get returns a session's description and transcript, 404 when unknown or expired.
func (s *sessionStore) get(id string) (sessionInfo, []json.RawMessage, error) {
	return s.describe(id, true)
}

// describe returns a committed session's description and, when loaded or with items, its
// transcript. A file is read outside the lock and only its counts are kept, since
// inspecting a session should not evict live ones.
func (s *sessionStore) describe(id string, items bool) (sessionInfo, []json.RawMessage, error) {
	s.mu.Lock()
	ss, err := s.liveLocked(id, true)
	var d *sessionData
	if err == nil {
		d = ss.data
	}
	read := err == nil && d == nil && (items || ss.counts == nil)
	s.mu.Unlock()
	if read {
		if d, err = s.read(id); errors.Is(err, fs.ErrNotExist) {
			err = errSessionNotFound
		}
	}
	if err != nil {
		return sessionInfo{}, nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	counts := ss.counts
	var transcript []json.RawMessage
	if d != nil {
		counts, transcript = d.counts(), d.items
	}
	if read && ss.counts == nil { // else a concurrent commit's counts win
		ss.counts = counts
	}
	info := *counts
	info.ID, info.Object = id, "session"
	info.LastUsedAt, info.ExpiresAt = ss.lastUsed.Unix(), ss.lastUsed.Add(s.ttl).Unix()
	return info, transcript, nil
}

// counts is the part of a sessionInfo that the transcript determines.
func (d *sessionData) counts() *sessionInfo {
	return &sessionInfo{CreatedAt: d.created.Unix(), Items: len(d.items), Bytes: sizeOf(d.items),
		Responses: len(d.responses)}
}

// delete removes a session, 404 when unknown or expired. A session with a request in
// flight is refused, since its commit would write the file again.
func (s *sessionStore) delete(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	ss, err := s.liveLocked(id, true)
	if err != nil {
		return err
	}
	if ss.users > 0 {
		return &apiError{kind: errConflict, code: "session_busy",
			msg: fmt.Sprintf("Session '%s' has a request in progress; retry the DELETE when it finishes", id)}
	}
	return s.removeLocked(ss)
}

// encodeSession writes the items by hand: they are valid JSON already, and json.Marshal
// would re-validate and compact every byte of a long transcript on every turn.
func encodeSession(id string, d *sessionData) []byte {
	h, _ := json.Marshal(sessionFile{ID: id, CreatedAt: d.created.Unix(), Latest: d.latest,
		Responses: d.responses, ItemIDs: d.itemIDs, Resends: d.resends})
	b := append(bytes.TrimSuffix(h, []byte("null}")), '[') // Items is last and nil
	b = slices.Grow(b, int(sizeOf(d.items))+2*len(d.items)+4)
	for i, it := range d.items {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(append(b, '\n'), it...)
	}
	return append(b, "\n]}\n"...)
}

// read loads session id's file; the error wraps fs.ErrNotExist when there is none. A file
// that cannot be used is left in place: it may be the only copy of someone's work.
func (s *sessionStore) read(id string) (*sessionData, error) {
	path := s.path(id)
	b, err := os.ReadFile(path)
	var d *sessionData
	if err == nil {
		d, err = parseSession(b, id)
	}
	if err != nil {
		return nil, &apiError{kind: errStorage, code: "session_unreadable", cause: err, msg: fmt.Sprintf(
			"session file %s is unreadable (%v); move it away or repair it to use this session id",
			path, err)}
	}
	return d, nil
}

// parseSession decodes session id's file. Files may be edited by hand, so it checks what
// the store relies on: response ids are file names and their counts slice the items.
func parseSession(b []byte, id string) (*sessionData, error) {
	var f sessionFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, err
	}
	if f.ID != id || f.Responses == nil {
		return nil, fmt.Errorf("not a file for session %q", id)
	}
	for r, n := range f.Responses {
		if !validSessionID(r) || n < 0 || n > len(f.Items) {
			return nil, fmt.Errorf("bad response entry %q: %d", r, n)
		}
	}
	if i := slices.IndexFunc(f.ItemIDs, func(id string) bool { return !validSessionID(id) }); i >= 0 {
		return nil, fmt.Errorf("bad item id %q", f.ItemIDs[i])
	}
	return &sessionData{created: time.Unix(f.CreatedAt, 0), items: f.Items, responses: f.Responses,
		latest: f.Latest, itemIDs: f.ItemIDs, resends: f.Resends}, nil
}

func sizeOf(items []json.RawMessage) int64 {
	var n int64
	for _, it := range items {
		n += int64(len(it))
	}
	return n
}

// stripID drops an output item's "id" and returns it: with store=false the backend rejects
// references to items it issued.
func stripID(item json.RawMessage) (json.RawMessage, string) {
	var m map[string]json.RawMessage
	var id string
	if json.Unmarshal(item, &m) != nil || json.Unmarshal(m["id"], &id) != nil {
		return item, ""
	}
	delete(m, "id")
	return marshal(m), id
}

// hasPrefix reports whether incoming starts with stored, compared by canonical keys. The
// walk is lazy and stops at the first difference, so an append turn decodes a few items.
func hasPrefix(incoming, stored []json.RawMessage) bool {
	next, stop := iter.Pull(canonKeys(incoming))
	defer stop()
	for want := range canonKeys(stored) {
		if got, ok := next(); !ok || got != want {
			return false
		}
	}
	return true
}

// canonKeys yields a transcript's items as keys that ignore what clients change when
// they resend history: ids and status, the content part type (string, input_text,
// output_text), reasoning items (chat clients drop them) and the split of a reply into
// consecutive assistant messages (a chat reply folds them into one).
func canonKeys(items []json.RawMessage) iter.Seq[string] {
	return func(yield func(string) bool) {
		reply := "" // consecutive assistant messages so far
		for _, raw := range items {
			var it struct {
				Type, Role, Name, Arguments string
				CallID                      string `json:"call_id"`
				Content, Output             json.RawMessage
			}
			if json.Unmarshal(raw, &it) != nil {
				it.Type = "invalid"
			}
			if it.Type == "" && it.Role != "" {
				it.Type = "message" // EasyInputMessage may omit type
			}
			var key string
			switch it.Type {
			case "reasoning":
				continue
			case "message":
				if it.Role == "assistant" {
					reply = cmp.Or(reply, "message\x00assistant\x00") + contentText(it.Content)
					continue
				}
				key = "message\x00" + it.Role + "\x00" + contentText(it.Content)
			case "function_call":
				key = "function_call\x00" + it.CallID + "\x00" + it.Name + "\x00" + it.Arguments
			case "function_call_output":
				key = "function_call_output\x00" + it.CallID + "\x00" + contentText(it.Output)
			default:
				key = otherKey(raw)
			}
			if reply != "" && !yield(reply) {
				return
			}
			reply = ""
			if !yield(key) {
				return
			}
		}
		if reply != "" {
			yield(reply)
		}
	}
}

// contentText joins a message's text parts, so that string content and input_text,
// output_text and text parts compare equal. Other parts (images) keep their otherKey.
func contentText(content json.RawMessage) string {
	var s string
	if json.Unmarshal(content, &s) == nil {
		return s
	}
	var parts []json.RawMessage
	json.Unmarshal(content, &parts)
	var b strings.Builder
	for _, p := range parts {
		var tp struct{ Type, Text string }
		json.Unmarshal(p, &tp)
		switch tp.Type {
		case "input_text", "output_text", "text":
			b.WriteString(tp.Text)
		default:
			b.WriteString(otherKey(p))
		}
	}
	return b.String()
}

// otherKey is an item's JSON without id and status, with its keys sorted by Marshal.
func otherKey(raw json.RawMessage) string {
	var m map[string]any
	if json.Unmarshal(raw, &m) != nil {
		return "raw\x00" + string(raw)
	}
	delete(m, "id")
	delete(m, "status")
	b, _ := json.Marshal(m)
	return string(b)
}
