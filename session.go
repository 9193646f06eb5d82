package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"
)

// loadedBudget is how many transcript bytes of idle sessions stay in memory.
// Beyond it the least recently used idle transcripts are dropped and re-read
// from disk on their next turn, so 10,000 idle sessions cost only index entries.
const loadedBudget = 64 << 20

// sessionStore keeps conversation transcripts in memory and one JSON file per session under dir.
//
// The backend runs with store=false (codex-backend §3.4), so the full history
// has to be resent every turn; this store is where that history lives.
// Response ids map to session ids through one tiny file per response under
// dir/responses/ (see commit), which survives restarts without scanning
// session files and costs no memory.
type sessionStore struct {
	dir         string
	respDir     string
	ttl         time.Duration
	maxSessions int
	maxBytes    int64
	now         func() time.Time
	newID       func() string // names forked sessions
	budget      int64         // see loadedBudget
	sync        bool          // fsync session files; only benchmarks turn it off

	mu       sync.Mutex
	index    map[string]*session   // every live session, loaded or not
	loaded   map[*session]struct{} // sessions whose transcript is in memory
	loadedSz int64
}

// session is one conversation. Its small index fields are guarded by st.mu;
// data is replaced (never mutated) under st.mu, by the lock holder or, for
// idle sessions, by the store.
type session struct {
	st   *sessionStore
	sid  string
	lock chan struct{} // holds a token while one request owns the session

	lastUsed time.Time
	users    int  // lock holder plus waiters; idle when 0
	onDisk   bool // a committed file exists
	known    bool // createdAt, items, responses and bytes below are valid
	created  time.Time
	items    int
	resps    int
	bytes    int64

	data *sessionData // nil while not loaded
}

// sessionData is an immutable snapshot of a transcript.
type sessionData struct {
	created   time.Time
	items     []json.RawMessage
	bytes     int64
	responses map[string]int // response id → item count after that turn
	latest    string
}

// sessionHeader is the start of a session file. Counts come before the
// responses map and items so list can stop reading after a few hundred bytes.
type sessionHeader struct {
	ID         string         `json:"id"`
	CreatedAt  int64          `json:"created_at"`
	LastUsedAt int64          `json:"last_used_at"`
	ItemCount  int            `json:"item_count"`
	RespCount  int            `json:"response_count"`
	Bytes      int64          `json:"bytes"`
	Latest     string         `json:"latest_response_id"`
	CRC        uint32         `json:"items_crc32c"` // of the items section, see readSession
	Responses  map[string]int `json:"responses"`
}

// castagnoli is the CRC-32C table; it is hardware-accelerated, so checking a
// long transcript costs microseconds where a JSON validity scan costs a
// millisecond.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

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

// newSessionStore opens dir, listing only names and mtimes: session files are
// read on first use, so start-up stays fast with many sessions on disk.
func newSessionStore(dir string, ttl time.Duration, maxSessions int, maxBytes int64, now func() time.Time) (*sessionStore, error) {
	s := &sessionStore{
		dir: dir, respDir: filepath.Join(dir, "responses"), ttl: ttl, maxSessions: maxSessions,
		maxBytes: maxBytes, now: now, newID: func() string { return "fork-" + rand.Text() },
		budget: loadedBudget, sync: true,
		index: map[string]*session{}, loaded: map[*session]struct{}{},
	}
	if err := os.MkdirAll(s.respDir, 0o700); err != nil {
		return nil, fmt.Errorf("create session directory: %w", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list sessions: %w", err)
	}
	for _, e := range entries {
		name := e.Name()
		id, ok := strings.CutSuffix(name, ".json")
		switch {
		case ok && validSessionID(id) && e.Type().IsRegular():
			fi, err := e.Info()
			if err != nil {
				continue // removed since ReadDir
			}
			s.index[id] = &session{st: s, sid: id, onDisk: true, lastUsed: fi.ModTime()}
		case strings.Contains(name, ".json.tmp"):
			// A crash between CreateTemp and Rename; the real file is intact.
			os.Remove(filepath.Join(dir, name))
		}
	}
	return s, nil
}

// validSessionID: 1–128 chars of [A-Za-z0-9._:-], not "." or ".." (ids come
// from URL paths and headers; they become file names).
func validSessionID(id string) bool {
	if id == "" || len(id) > 128 || id == "." || id == ".." {
		return false
	}
	for _, c := range []byte(id) {
		ok := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("._:-", c) >= 0
		if !ok {
			return false
		}
	}
	return true
}

// errSessionNotFound is the 404 for GET and DELETE /codex/sessions/{id}.
func errSessionNotFound() *apiError {
	return &apiError{status: 404, typ: "invalid_request_error", code: "session_not_found", message: "Session not found"}
}

// errResponseNotFound is OpenAI's wording for an unknown previous_response_id.
func errResponseNotFound(id string) *apiError {
	return &apiError{status: 404, typ: "invalid_request_error", param: "previous_response_id",
		code: "previous_response_not_found", message: fmt.Sprintf("Previous response with id '%s' not found.", id)}
}

// acquire locks session id for one turn, creating it when new (evicting the
// oldest idle session when maxSessions is reached, or a 429 when every session
// is busy). It waits while another request holds the same session and gives
// up with ctx.Err() when ctx ends.
func (s *sessionStore) acquire(ctx context.Context, id string) (*session, error) {
	if !validSessionID(id) {
		return nil, invalidRequest("session_id", "invalid session id %q: use 1-128 characters from A-Z a-z 0-9 . _ : -", id)
	}
	s.mu.Lock()
	ss, err := s.enterLocked(id, true)
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if err := ss.lockAndLoad(ctx); err != nil {
		return nil, err
	}
	return ss, nil
}

// acquireResponse locks the session that produced response respID (for
// previous_response_id), 404 apiError when unknown. If respID is the session's
// latest response the session continues; otherwise (a branch) a new session is
// forked whose transcript is the history up to and including that response.
func (s *sessionStore) acquireResponse(ctx context.Context, respID string) (*session, error) {
	if !validSessionID(respID) {
		return nil, errResponseNotFound(respID)
	}
	b, err := os.ReadFile(filepath.Join(s.respDir, respID))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, errResponseNotFound(respID)
	} else if err != nil {
		return nil, fmt.Errorf("read response index: %w", err)
	}
	s.mu.Lock()
	ss, err := s.enterLocked(string(b), false)
	s.mu.Unlock()
	if err != nil {
		return nil, errResponseNotFound(respID)
	}
	if err := ss.lockAndLoad(ctx); err != nil {
		return nil, err
	}
	d := ss.data
	n, ok := d.responses[respID]
	if !ok {
		// The index file outlived its session (deleted and recreated).
		ss.release()
		return nil, errResponseNotFound(respID)
	}
	if respID == d.latest {
		return ss, nil
	}
	defer ss.release()
	s.mu.Lock()
	fork, err := s.enterLocked(s.newID(), true)
	if err == nil {
		items := d.items[:n:n] // snapshots are immutable, so sharing is safe
		s.setDataLocked(fork, &sessionData{created: s.now(), items: items, bytes: sizeOf(items), responses: map[string]int{}})
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if err := fork.lockAndLoad(ctx); err != nil {
		return nil, err
	}
	return fork, nil
}

// enterLocked finds (or, with create, makes) session id and counts the caller
// as a user so it is neither evicted nor expired while waiting for the lock.
func (s *sessionStore) enterLocked(id string, create bool) (*session, error) {
	ss := s.index[id]
	if ss != nil && ss.users == 0 && s.expiredLocked(ss) {
		if err := s.removeLocked(ss); err != nil {
			return nil, err
		}
		ss = nil
	}
	if ss == nil {
		if !create {
			return nil, errSessionNotFound()
		}
		for s.maxSessions > 0 && len(s.index) >= s.maxSessions {
			var oldest *session
			for _, c := range s.index {
				if c.users == 0 && (oldest == nil || c.lastUsed.Before(oldest.lastUsed)) {
					oldest = c
				}
			}
			if oldest == nil {
				return nil, &apiError{status: 429, typ: "rate_limit_error", code: "too_many_sessions", message: fmt.Sprintf(
					"All %d sessions are busy; delete sessions with DELETE /codex/sessions/{id} or raise --max-sessions", s.maxSessions)}
			}
			if err := s.removeLocked(oldest); err != nil {
				return nil, err
			}
		}
		ss = &session{st: s, sid: id}
		s.index[id] = ss
	}
	if ss.lock == nil {
		ss.lock = make(chan struct{}, 1)
	}
	ss.users++
	ss.lastUsed = s.now()
	return ss, nil
}

// expiredLocked reports whether ss has been idle longer than the ttl.
func (s *sessionStore) expiredLocked(ss *session) bool {
	return s.ttl > 0 && s.now().Sub(ss.lastUsed) > s.ttl
}

// removeLocked deletes an idle session's file and its response index files.
// Cleaning the index is best effort: a leftover entry points to a session that
// no longer lists the response, which acquireResponse treats as unknown.
func (s *sessionStore) removeLocked(ss *session) error {
	path := s.path(ss.sid)
	var resps map[string]int
	if ss.data != nil {
		resps = ss.data.responses
	} else if ss.onDisk {
		h, _ := readHeader(path, true)
		resps = h.Responses
	}
	for r := range resps {
		// A fork shares no index files, but a recreated session might; only
		// drop entries that still point here.
		rp := filepath.Join(s.respDir, r)
		if b, err := os.ReadFile(rp); err == nil && string(b) == ss.sid {
			os.Remove(rp)
		}
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove session: %w", err)
	}
	delete(s.index, ss.sid)
	s.unloadLocked(ss)
	return nil
}

// unloadLocked drops a transcript from memory; the file still has it.
func (s *sessionStore) unloadLocked(ss *session) {
	if _, ok := s.loaded[ss]; ok {
		delete(s.loaded, ss)
		s.loadedSz -= ss.data.bytes
	}
	ss.data = nil
}

// setDataLocked installs a new transcript snapshot and keeps the budget's books.
func (s *sessionStore) setDataLocked(ss *session, d *sessionData) {
	s.unloadLocked(ss)
	ss.data = d
	s.loaded[ss] = struct{}{}
	s.loadedSz += d.bytes
	ss.known, ss.created, ss.items, ss.resps, ss.bytes = true, d.created, len(d.items), len(d.responses), d.bytes
}

// path is the session's file.
func (s *sessionStore) path(id string) string { return filepath.Join(s.dir, id+".json") }

// lockAndLoad waits for the session's lock and reads its file if needed; on
// failure the caller's claim is given back.
func (ss *session) lockAndLoad(ctx context.Context) error {
	select {
	case ss.lock <- struct{}{}:
	case <-ctx.Done():
		ss.leave()
		return ctx.Err()
	}
	s := ss.st
	s.mu.Lock()
	d, onDisk := ss.data, ss.onDisk
	s.mu.Unlock()
	if d != nil {
		return nil
	}
	d = &sessionData{created: s.now(), responses: map[string]int{}}
	if onDisk {
		var err error
		if d, err = readSession(s.path(ss.sid), ss.sid); err != nil {
			ss.release()
			if errors.Is(err, fs.ErrNotExist) {
				return unreadable(s.path(ss.sid), err) // removed behind our back
			}
			return err
		}
	}
	s.mu.Lock()
	s.setDataLocked(ss, d)
	s.mu.Unlock()
	return nil
}

// id is the session id.
func (ss *session) id() string { return ss.sid }

// input returns the upstream input for a turn: the stored transcript followed
// by incoming, unless incoming already starts with the stored transcript (a
// client resending the whole history), then incoming as is. It returns a 413
// apiError when the result would exceed maxBytes.
func (ss *session) input(incoming []json.RawMessage) ([]json.RawMessage, error) {
	stored := ss.data.items
	out := incoming
	if len(stored) == 0 || !hasPrefix(incoming, stored) {
		out = slices.Concat(stored, incoming)
	}
	if n := sizeOf(out); ss.st.maxBytes > 0 && n > ss.st.maxBytes {
		return nil, &apiError{status: 413, typ: "invalid_request_error", code: "session_too_large", message: fmt.Sprintf(
			"Session '%s' would grow to %d bytes, over the limit of %d; delete it with DELETE /codex/sessions/%s or start a new session",
			ss.sid, n, ss.st.maxBytes, ss.sid)}
	}
	return out, nil
}

// commit records a finished turn: the transcript becomes sent (what input
// returned) + output, responseID maps to it; it is written to disk atomically
// before commit returns. On error the previous transcript stays intact in
// memory and on disk.
func (ss *session) commit(sent, output []json.RawMessage, responseID string) error {
	s := ss.st
	if !validSessionID(responseID) {
		return fmt.Errorf("save session %s: unusable response id %q", ss.sid, responseID)
	}
	items := append(make([]json.RawMessage, 0, len(sent)+len(output)), sent...)
	for _, it := range output {
		items = append(items, stripID(it))
	}
	for i, it := range items {
		// One item per line is what lets readSession split the file cheaply.
		if bytes.IndexByte(it, '\n') >= 0 {
			var b bytes.Buffer
			if err := json.Compact(&b, it); err != nil {
				return fmt.Errorf("save session %s: item %d: %w", ss.sid, i, err)
			}
			items[i] = b.Bytes()
		}
	}
	old := ss.data
	d := &sessionData{created: old.created, items: items, bytes: sizeOf(items), responses: make(map[string]int, len(old.responses)+1), latest: responseID}
	for k, v := range old.responses {
		d.responses[k] = v
	}
	d.responses[responseID] = len(items)
	now := s.now()
	// The index file goes first and unsynced: if it is lost or torn, the
	// lookup only finds a session that does not list the response, a 404.
	rp := filepath.Join(s.respDir, responseID)
	if err := os.WriteFile(rp, []byte(ss.sid), 0o600); err != nil {
		return fmt.Errorf("save session %s: %w", ss.sid, err)
	}
	if err := s.writeFile(ss.sid, encodeSession(ss.sid, d, now), now); err != nil {
		os.Remove(rp)
		return fmt.Errorf("save session %s: %w", ss.sid, err)
	}
	s.mu.Lock()
	s.setDataLocked(ss, d)
	ss.onDisk = true
	s.mu.Unlock()
	return nil
}

// release unlocks the session; a turn that never committed (failed,
// cancelled) leaves the transcript unchanged.
func (ss *session) release() {
	ss.leave()
	<-ss.lock
}

// leave gives back a caller's claim; a session that never reached disk
// vanishes with its last user, and idle transcripts beyond the budget go.
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
		s.unloadLocked(ss)
	}
	for s.loadedSz > s.budget {
		var oldest *session
		for c := range s.loaded {
			if c.users == 0 && (oldest == nil || c.lastUsed.Before(oldest.lastUsed)) {
				oldest = c
			}
		}
		if oldest == nil {
			return
		}
		s.unloadLocked(oldest)
	}
}

// list returns all live sessions, most recently used first, including
// sessions on disk from before a restart that nobody has used since.
func (s *sessionStore) list() ([]sessionInfo, error) {
	s.mu.Lock()
	var unknown []*session
	for _, ss := range s.index {
		if ss.users == 0 && s.expiredLocked(ss) {
			if err := s.removeLocked(ss); err != nil {
				s.mu.Unlock()
				return nil, err
			}
		} else if !ss.known && ss.onDisk {
			unknown = append(unknown, ss)
		}
	}
	s.mu.Unlock()
	// Header reads happen outside the lock; a concurrent commit makes the
	// entry known and wins.
	heads := make([]sessionHeader, len(unknown))
	for i, ss := range unknown {
		h, err := readHeader(s.path(ss.sid), false)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		} else if err != nil {
			return nil, unreadable(s.path(ss.sid), err)
		}
		heads[i] = h
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, ss := range unknown {
		if h := heads[i]; !ss.known && h.ID != "" {
			ss.known, ss.created, ss.items, ss.resps, ss.bytes = true, time.Unix(h.CreatedAt, 0), h.ItemCount, h.RespCount, h.Bytes
		}
	}
	infos := make([]sessionInfo, 0, len(s.index))
	for _, ss := range s.index {
		if ss.known && ss.onDisk {
			infos = append(infos, s.infoLocked(ss))
		}
	}
	sort.Slice(infos, func(i, j int) bool { return infos[i].LastUsedAt > infos[j].LastUsedAt })
	return infos, nil
}

// infoLocked describes a session whose counts are known.
func (s *sessionStore) infoLocked(ss *session) sessionInfo {
	return sessionInfo{ID: ss.sid, Object: "session", CreatedAt: ss.created.Unix(), LastUsedAt: ss.lastUsed.Unix(),
		ExpiresAt: ss.lastUsed.Add(s.ttl).Unix(), Items: ss.items, Bytes: ss.bytes, Responses: ss.resps}
}

// get returns a session's description and transcript, 404 apiError "Session
// not found" when unknown or expired.
func (s *sessionStore) get(id string) (sessionInfo, []json.RawMessage, error) {
	s.mu.Lock()
	ss, d, err := s.findLocked(id)
	s.mu.Unlock()
	if err != nil {
		return sessionInfo{}, nil, err
	}
	if d == nil {
		// Read without caching: inspecting a session should not evict live ones.
		if d, err = readSession(s.path(id), id); errors.Is(err, fs.ErrNotExist) {
			return sessionInfo{}, nil, errSessionNotFound()
		} else if err != nil {
			return sessionInfo{}, nil, err
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	info := s.infoLocked(ss)
	info.CreatedAt, info.Items, info.Bytes, info.Responses = d.created.Unix(), len(d.items), d.bytes, len(d.responses)
	return info, d.items, nil
}

// findLocked returns a live committed session and its loaded transcript (nil
// if not in memory), removing it first if it has expired.
func (s *sessionStore) findLocked(id string) (*session, *sessionData, error) {
	ss := s.index[id]
	if ss == nil || !ss.onDisk {
		return nil, nil, errSessionNotFound()
	}
	if ss.users == 0 && s.expiredLocked(ss) {
		if err := s.removeLocked(ss); err != nil {
			return nil, nil, err
		}
		return nil, nil, errSessionNotFound()
	}
	return ss, ss.data, nil
}

// delete removes a session, 404 when unknown or expired. A session with a
// request in flight is refused, since its commit would write the file again.
func (s *sessionStore) delete(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	ss, _, err := s.findLocked(id)
	if err != nil {
		return err
	}
	if ss.users > 0 {
		return &apiError{status: 409, typ: "invalid_request_error", code: "session_busy",
			message: fmt.Sprintf("Session '%s' has a request in progress; retry the DELETE when it finishes", id)}
	}
	return s.removeLocked(ss)
}

// writeFile replaces id's file atomically: a crash leaves either the old or
// the new file, plus at most a stray temp file that newSessionStore removes.
func (s *sessionStore) writeFile(id string, b []byte, mtime time.Time) (err error) {
	f, err := os.CreateTemp(s.dir, id+".json.tmp*") // mode 0600
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if _, err = f.Write(b); err != nil {
		return err
	}
	if s.sync {
		if err = f.Sync(); err != nil {
			return err
		}
	}
	if err = f.Close(); err != nil {
		return err
	}
	// mtime carries last use across restarts, on the injected clock.
	if err = os.Chtimes(f.Name(), mtime, mtime); err != nil {
		return err
	}
	return os.Rename(f.Name(), s.path(id))
}

// encodeSession writes the file by hand: items are already valid JSON (they
// were decoded from a request or the upstream), and json.Marshal would
// re-validate and compact every byte of a long transcript on every turn.
func encodeSession(id string, d *sessionData, now time.Time) []byte {
	items := make([]byte, 0, int(d.bytes)+2*len(d.items))
	for i, it := range d.items {
		if i > 0 {
			items = append(items, ',')
		}
		items = append(items, '\n')
		items = append(items, it...)
	}
	h, _ := json.Marshal(sessionHeader{ID: id, CreatedAt: d.created.Unix(), LastUsedAt: now.Unix(), ItemCount: len(d.items),
		RespCount: len(d.responses), Bytes: d.bytes, Latest: d.latest, CRC: crc32.Checksum(items, castagnoli), Responses: d.responses})
	b := make([]byte, 0, len(h)+len(items)+32)
	b = append(b, h[:len(h)-1]...)
	b = append(b, `,"items":[`...)
	b = append(b, items...)
	return append(b, "\n]}\n"...)
}

// readSession loads a whole session file. A file in encodeSession's layout
// whose checksum matches is split by lines without decoding, since its items
// were valid JSON when written; anything else (a hand-edited file) takes the
// general decoder, which rejects torn or invalid JSON.
func readSession(path, id string) (*sessionData, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		return nil, unreadable(path, err)
	}
	var f struct {
		sessionHeader
		Items []json.RawMessage `json:"items"`
	}
	head, rest, ok := bytes.Cut(b, []byte(`,"items":[`))
	rest, ok2 := bytes.CutSuffix(rest, []byte("\n]}\n"))
	ok = ok && ok2 && json.Unmarshal(append(head[:len(head):len(head)], '}'), &f.sessionHeader) == nil &&
		f.CRC == crc32.Checksum(rest, castagnoli)
	if ok && len(rest) > 0 {
		for it := range bytes.SplitSeq(rest[1:], []byte(",\n")) {
			if len(it) < 2 || it[0] != '{' || it[len(it)-1] != '}' {
				ok = false
			}
			f.Items = append(f.Items, it)
		}
	}
	if !ok || len(f.Items) != f.ItemCount || sizeOf(f.Items) != f.Bytes {
		f.Items = nil
		if err := json.Unmarshal(b, &f); err != nil {
			return nil, unreadable(path, err)
		}
	}
	if f.ID != id || f.Responses == nil {
		return nil, unreadable(path, fmt.Errorf("file is for session %q, not %q", f.ID, id))
	}
	return &sessionData{created: time.Unix(f.CreatedAt, 0), items: f.Items, bytes: sizeOf(f.Items), responses: f.Responses, latest: f.Latest}, nil
}

// readHeader decodes a session file up to its responses map (withResponses)
// or only its counts, so listing 10,000 sessions reads a few KB of each. A
// file torn in its items is caught only when the session is loaded.
func readHeader(path string, withResponses bool) (sessionHeader, error) {
	var h sessionHeader
	f, err := os.Open(path)
	if err != nil {
		return h, err
	}
	defer f.Close()
	dec := json.NewDecoder(f)
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return h, fmt.Errorf("not a session file: %v", err)
	}
	fields := map[string]any{"id": &h.ID, "created_at": &h.CreatedAt, "item_count": &h.ItemCount,
		"response_count": &h.RespCount, "bytes": &h.Bytes, "latest_response_id": &h.Latest}
	if withResponses {
		fields["responses"] = &h.Responses
	}
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return h, err
		}
		key, _ := t.(string)
		if key == "items" {
			if h.Responses == nil {
				return h, errors.New("no responses before items")
			}
			return h, nil
		}
		if key == "responses" && !withResponses {
			return h, nil
		}
		var v any = new(json.RawMessage)
		if p, ok := fields[key]; ok {
			v = p
		}
		if err := dec.Decode(v); err != nil {
			return h, err
		}
	}
	return h, errors.New("truncated header")
}

// unreadable is the 500 for a session file that exists but cannot be used.
// The file is left in place: it may be the only copy of someone's work.
func unreadable(path string, err error) *apiError {
	return &apiError{status: 500, typ: "api_error", code: "session_unreadable", message: fmt.Sprintf(
		"session file %s is unreadable (%v); move it away or repair it to use this session id", path, err)}
}

// sizeOf is a transcript's size as counted against maxBytes.
func sizeOf(items []json.RawMessage) int64 {
	var n int64
	for _, it := range items {
		n += int64(len(it))
	}
	return n
}

// stripID drops an output item's "id": with store=false the backend rejects
// references to items it issued (codex-backend §3.4). Everything else stays,
// encrypted_content and call_id included.
func stripID(item json.RawMessage) json.RawMessage {
	var m map[string]json.RawMessage
	if json.Unmarshal(item, &m) != nil {
		return item
	}
	if _, ok := m["id"]; !ok {
		return item
	}
	delete(m, "id")
	b, err := json.Marshal(m)
	if err != nil {
		return item
	}
	return b
}

// hasPrefix reports whether incoming starts with stored, compared
// canonically (see canon). It walks both lazily and stops at the first
// difference, so the common append turn costs a couple of item decodes.
func hasPrefix(incoming, stored []json.RawMessage) bool {
	in, st := canonIter{items: incoming}, canonIter{items: stored}
	for {
		want, ok := st.next()
		if !ok {
			return true
		}
		if got, ok := in.next(); !ok || got != want {
			return false
		}
	}
}

// canonIter yields the canonical keys of a transcript. Reasoning items are
// skipped (chat clients never resend them) and consecutive assistant messages
// merge, because a chat reply folds them into one message.
type canonIter struct {
	items []json.RawMessage
	i     int
}

// canonItem is the subset of a Responses item that canonical keys use.
type canonItem struct {
	Type      string          `json:"type"`
	Role      string          `json:"role"`
	Content   json.RawMessage `json:"content"`
	CallID    string          `json:"call_id"`
	Name      string          `json:"name"`
	Arguments string          `json:"arguments"`
	Output    json.RawMessage `json:"output"`
}

// next returns the next canonical key, or false at the end.
func (c *canonIter) next() (string, bool) {
	var key string
	for c.i < len(c.items) {
		var it canonItem
		raw := c.items[c.i]
		if json.Unmarshal(raw, &it) != nil {
			it = canonItem{Type: "invalid"}
		}
		if it.Type == "" && it.Role != "" {
			it.Type = "message" // EasyInputMessage may omit type
		}
		switch {
		case it.Type == "reasoning":
			c.i++
			continue
		case it.Type == "message" && it.Role == "assistant" && strings.HasPrefix(key, "message\x00assistant\x00"):
			key += contentText(it.Content)
			c.i++
			continue
		case key != "":
			return key, true
		case it.Type == "message":
			key = "message\x00" + it.Role + "\x00" + contentText(it.Content)
		case it.Type == "function_call":
			key = "function_call\x00" + it.CallID + "\x00" + it.Name + "\x00" + it.Arguments
		case it.Type == "function_call_output":
			key = "function_call_output\x00" + it.CallID + "\x00" + outputText(it.Output)
		default:
			key = otherKey(raw)
		}
		c.i++
		if it.Type != "message" || it.Role != "assistant" {
			return key, true
		}
	}
	return key, key != ""
}

// contentText joins a message's text parts so that a string content, an
// input_text, an output_text and a text part with the same text compare equal.
// Non-text parts (images) keep their JSON minus id/status.
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

// outputText normalizes a function_call_output's output: a string or parts.
func outputText(out json.RawMessage) string {
	if len(out) > 0 && out[0] == '"' {
		var s string
		json.Unmarshal(out, &s)
		return s
	}
	return contentText(out)
}

// otherKey is an item's JSON without id and status; Marshal sorts map keys,
// so field order does not matter.
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
