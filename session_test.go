package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeClock is the injected clock; tests move it by hand.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Unix(1_800_000_000, 0)} }

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// newTestStore opens a store on dir with a 24h ttl.
func newTestSessionStore(t testing.TB, dir string, clock *fakeClock, maxSessions int, maxBytes int64) *sessionStore {
	t.Helper()
	s, err := newSessionStore(dir, 24*time.Hour, maxSessions, maxBytes, clock.now)
	if err != nil {
		t.Fatalf("newSessionStore: %v", err)
	}
	return s
}

// js compacts a JSON literal into an item.
func js(format string, args ...any) json.RawMessage {
	return json.RawMessage(fmt.Sprintf(format, args...))
}

func userMsg(text string) json.RawMessage {
	return js(`{"type":"message","role":"user","content":[{"type":"input_text","text":%q}]}`, text)
}

func assistantMsg(id, text string) json.RawMessage {
	return js(`{"type":"message","id":%q,"status":"completed","role":"assistant","content":[{"type":"output_text","text":%q,"annotations":[]}]}`, id, text)
}

func reasoningItem(id string) json.RawMessage {
	return js(`{"type":"reasoning","id":%q,"summary":[],"encrypted_content":"gAAAA%s"}`, id, id)
}

// sessionTurn runs one committed turn and returns what was sent upstream.
func sessionTurn(t testing.TB, s *sessionStore, id string, incoming, output []json.RawMessage, respID string) []json.RawMessage {
	t.Helper()
	ss, err := s.acquire(context.Background(), id)
	if err != nil {
		t.Fatalf("acquire(%q): %v", id, err)
	}
	defer ss.release()
	sent, err := ss.input(incoming)
	if err != nil {
		t.Fatalf("input: %v", err)
	}
	if err := ss.commit(sent, output, respID, nil, 0); err != nil {
		t.Fatalf("commit: %v", err)
	}
	return sent
}

// peek returns the upstream input a turn with incoming would send, without committing.
func peek(t testing.TB, ss *session, incoming ...json.RawMessage) string {
	t.Helper()
	sent, err := ss.input(incoming)
	if err != nil {
		t.Fatalf("input: %v", err)
	}
	return texts(sent)
}

// texts renders items compactly for comparisons: type:text or type.
func texts(items []json.RawMessage) string {
	var out []string
	for _, it := range items {
		var m struct {
			Type    string
			Role    string
			Content []struct{ Text string }
		}
		json.Unmarshal(it, &m)
		s := m.Type
		if m.Role != "" {
			s = m.Role
		}
		for _, c := range m.Content {
			s += ":" + c.Text
		}
		out = append(out, s)
	}
	return strings.Join(out, " | ")
}

// shown is what a client is told of an error.
type shown struct {
	status                    int
	typ, code, param, message string
	header                    http.Header
}

// show describes err as the client sees it.
func show(err error) shown {
	k, code, param, header := describe(err)
	return shown{k.status, k.typ, code, param, err.Error(), header}
}

// wantAPIError checks that err reaches the client with the given status and code.
func wantAPIError(t *testing.T, err error, status int, code string) shown {
	t.Helper()
	if err == nil {
		t.Fatalf("err = nil; want %d %s", status, code)
	}
	ae := show(err)
	if ae.status != status || ae.code != code {
		t.Fatalf("err = %d %s %q; want %d %s", ae.status, ae.code, ae.message, status, code)
	}
	return ae
}

// waitUsers spins until session id has n users, proving that a goroutine is
// parked in acquire.
func waitUsers(s *sessionStore, id string, n int) {
	for {
		s.mu.Lock()
		ss := s.index[id]
		got := ss != nil && ss.users == n
		s.mu.Unlock()
		if got {
			return
		}
		runtime.Gosched()
	}
}

func TestValidSessionID(t *testing.T) {
	tests := []struct {
		id   string
		want bool
	}{
		{"a", true}, {"My-session_1.2:3", true}, {strings.Repeat("x", 128), true},
		{"", false}, {".", false}, {"..", false}, {"a/b", false}, {`a\b`, false},
		{"a b", false}, {strings.Repeat("x", 129), false}, {"é", false}, {"a\x00", false},
	}
	for _, tc := range tests {
		t.Run(tc.id, func(t *testing.T) {
			if got := validSessionID(tc.id); got != tc.want {
				t.Errorf("validSessionID(%q) = %v; want %v", tc.id, got, tc.want)
			}
		})
	}
}

func TestStripID(t *testing.T) {
	tests := []struct{ name, in, want string }{
		{"reasoning", `{"type":"reasoning","id":"rs_1","encrypted_content":"gAAA","summary":[]}`, `{"encrypted_content":"gAAA","summary":[],"type":"reasoning"}`},
		{"call", `{"type":"function_call","id":"fc_1","call_id":"call_1","name":"f","arguments":"{}","status":"completed"}`, `{"arguments":"{}","call_id":"call_1","name":"f","status":"completed","type":"function_call"}`},
		{"no id", `{"type":"message","role":"user"}`, `{"type":"message","role":"user"}`},
		{"not an object", `[1]`, `[1]`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := string(stripped(json.RawMessage(tc.in))); got != tc.want {
				t.Errorf("stripID(%s) = %s; want %s", tc.in, got, tc.want)
			}
		})
	}
}

func TestSessionAppendAcrossTurns(t *testing.T) {
	s := newTestSessionStore(t, t.TempDir(), newFakeClock(), 10, 0)
	sessionTurn(t, s, "alice", []json.RawMessage{userMsg("My name is Alice")},
		[]json.RawMessage{reasoningItem("rs_1"), assistantMsg("msg_1", "Nice to meet you, Alice.")}, "resp_1")
	sent := sessionTurn(t, s, "alice", []json.RawMessage{userMsg("What is my name?")},
		[]json.RawMessage{assistantMsg("msg_2", "Alice.")}, "resp_2")
	got := texts(sent)
	want := "user:My name is Alice | reasoning | assistant:Nice to meet you, Alice. | user:What is my name?"
	if got != want {
		t.Errorf("turn 2 input = %s; want %s", got, want)
	}
	_, items, err := s.get("alice")
	if err != nil {
		t.Fatalf("get: %v", err)
	}
	for _, it := range items {
		if strings.Contains(string(it), `"id"`) {
			t.Errorf("stored item %s keeps its server id", it)
		}
	}
	if !strings.Contains(string(items[1]), `"encrypted_content":"gAAAArs_1"`) {
		t.Errorf("stored reasoning %s lost encrypted_content", items[1])
	}
}

func TestSessionPrefixRule(t *testing.T) {
	stored := []json.RawMessage{userMsg("hi"), reasoningItem("rs_1"), assistantMsg("msg_1", "hello"),
		js(`{"type":"function_call","id":"fc_1","call_id":"c1","name":"ls","arguments":"{}"}`),
		js(`{"type":"function_call_output","call_id":"c1","output":"a.txt"}`)}
	tests := []struct {
		name     string
		incoming []json.RawMessage
		want     string
	}{
		{"new message appended", []json.RawMessage{userMsg("next")},
			"user:hi | reasoning | assistant:hello | function_call | function_call_output | user:next"},
		{"native resend with ids and reasoning", []json.RawMessage{userMsg("hi"), reasoningItem("rs_1"), assistantMsg("msg_1", "hello"),
			js(`{"type":"function_call","call_id":"c1","name":"ls","arguments":"{}","status":"completed"}`),
			js(`{"type":"function_call_output","call_id":"c1","output":"a.txt"}`), userMsg("next")},
			"user:hi | reasoning | assistant:hello | function_call | function_call_output | user:next"},
		{"chat resend without reasoning, plain string content", []json.RawMessage{
			js(`{"role":"user","content":"hi"}`), js(`{"type":"message","role":"assistant","content":[{"type":"input_text","text":"hello"}]}`),
			js(`{"type":"function_call","call_id":"c1","name":"ls","arguments":"{}"}`),
			js(`{"type":"function_call_output","call_id":"c1","output":[{"type":"input_text","text":"a.txt"}]}`), userMsg("next")},
			"user | assistant:hello | function_call | function_call_output | user:next"},
		{"edited history appended", []json.RawMessage{userMsg("hi!"), assistantMsg("", "hello"), userMsg("next")},
			"user:hi | reasoning | assistant:hello | function_call | function_call_output | user:hi! | assistant:hello | user:next"},
		{"different tool output appended", []json.RawMessage{userMsg("hi"), assistantMsg("", "hello"),
			js(`{"type":"function_call","call_id":"c1","name":"ls","arguments":"{}"}`),
			js(`{"type":"function_call_output","call_id":"c1","output":"b.txt"}`)},
			"user:hi | reasoning | assistant:hello | function_call | function_call_output | user:hi | assistant:hello | function_call | function_call_output"},
		{"different call id appended", []json.RawMessage{userMsg("hi"), assistantMsg("", "hello"),
			js(`{"type":"function_call","call_id":"c2","name":"ls","arguments":"{}"}`),
			js(`{"type":"function_call_output","call_id":"c2","output":"a.txt"}`)},
			"user:hi | reasoning | assistant:hello | function_call | function_call_output | user:hi | assistant:hello | function_call | function_call_output"},
		{"shorter than stored appended", []json.RawMessage{userMsg("hi")},
			"user:hi | reasoning | assistant:hello | function_call | function_call_output | user:hi"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newTestSessionStore(t, t.TempDir(), newFakeClock(), 10, 0)
			sessionTurn(t, s, "p", stored[:1], stored[1:], "resp_1")
			ss, err := s.acquire(context.Background(), "p")
			if err != nil {
				t.Fatal(err)
			}
			defer ss.release()
			if got := peek(t, ss, tc.incoming...); got != tc.want {
				t.Errorf("input = %s\nwant    %s", got, tc.want)
			}
		})
	}
}

// A chat client resends [user, assistant] after a turn that stored
// [user, reasoning, assistant]: the history must not be doubled.
func TestSessionChatResend(t *testing.T) {
	s := newTestSessionStore(t, t.TempDir(), newFakeClock(), 10, 0)
	sessionTurn(t, s, "chat", []json.RawMessage{userMsg("My name is Alice")},
		[]json.RawMessage{reasoningItem("rs_1"), assistantMsg("msg_1", "Hi Alice.")}, "resp_1")
	incoming := []json.RawMessage{js(`{"role":"user","content":"My name is Alice"}`),
		js(`{"role":"assistant","content":"Hi Alice."}`), js(`{"role":"user","content":"Who am I?"}`)}
	sent := sessionTurn(t, s, "chat", incoming, []json.RawMessage{assistantMsg("msg_2", "Alice.")}, "resp_2")
	if got, want := len(sent), 3; got != want {
		t.Errorf("len(input) = %d (%s); want %d, the resend as is", got, texts(sent), want)
	}
}

// The Codex CLI resends its whole history, and after compacting it sends a shorter one
// (base prompt, user turns, summary): that replaces the transcript, also after a restart.
func TestSessionRewrittenHistory(t *testing.T) {
	dir, clock := t.TempDir(), newFakeClock()
	s := newTestSessionStore(t, dir, clock, 10, 0)
	base, first := userMsg("base prompt"), userMsg("first")
	sessionTurn(t, s, "cli", []json.RawMessage{base, first}, []json.RawMessage{assistantMsg("m1", "one")}, "resp_1")
	sessionTurn(t, s, "cli", []json.RawMessage{base, first, assistantMsg("", "one"), userMsg("compact")},
		[]json.RawMessage{assistantMsg("m2", "summary")}, "resp_2")
	s = newTestSessionStore(t, dir, clock, 10, 0) // the flag survives a restart
	compacted := []json.RawMessage{base, first, userMsg("summary"), userMsg("second")}
	sent := sessionTurn(t, s, "cli", compacted, []json.RawMessage{assistantMsg("m3", "two")}, "resp_3")
	if got, want := texts(sent), "user:base prompt | user:first | user:summary | user:second"; got != want {
		t.Errorf("input after compaction = %s\nwant %s", got, want)
	}
}

func TestSessionRestart(t *testing.T) {
	dir, clock := t.TempDir(), newFakeClock()
	s := newTestSessionStore(t, dir, clock, 10, 0)
	sessionTurn(t, s, "r", []json.RawMessage{userMsg("My name is Alice")}, []json.RawMessage{assistantMsg("m1", "ok")}, "resp_1")
	sessionTurn(t, s, "r", []json.RawMessage{userMsg("I like tea")}, []json.RawMessage{assistantMsg("m2", "ok")}, "resp_2")

	s2 := newTestSessionStore(t, dir, clock, 10, 0)
	if ss := s2.index["r"]; ss == nil || ss.data != nil {
		t.Fatalf("after restart index[r] = %+v; want an entry with no transcript loaded", ss)
	}
	ss, err := s2.acquire(context.Background(), "r")
	if err != nil {
		t.Fatal(err)
	}
	got := peek(t, ss, userMsg("Who am I?"))
	ss.release()
	want := "user:My name is Alice | assistant:ok | user:I like tea | assistant:ok | user:Who am I?"
	if got != want {
		t.Errorf("input after restart = %s; want %s", got, want)
	}
	infos, err := s2.list()
	if err != nil || len(infos) != 1 || infos[0].Items != 4 || infos[0].Responses != 2 {
		t.Errorf("list() = %+v, %v; want one session with 4 items and 2 responses", infos, err)
	}
	ss, err = s2.acquireResponse(context.Background(), "resp_1")
	if err != nil {
		t.Fatalf("acquireResponse after restart: %v", err)
	}
	defer ss.release()
	if got, want := peek(t, ss), "user:My name is Alice | assistant:ok"; got != want {
		t.Errorf("fork of resp_1 after restart = %s; want %s", got, want)
	}
}

func TestSessionExpiry(t *testing.T) {
	dir, clock := t.TempDir(), newFakeClock()
	s := newTestSessionStore(t, dir, clock, 10, 0)
	sessionTurn(t, s, "old", []json.RawMessage{userMsg("a")}, []json.RawMessage{assistantMsg("m", "b")}, "resp_old")
	clock.advance(23 * time.Hour)
	sessionTurn(t, s, "new", []json.RawMessage{userMsg("c")}, []json.RawMessage{assistantMsg("m", "d")}, "resp_new")
	clock.advance(2 * time.Hour) // old idle 25h, new idle 2h

	if _, _, err := s.get("old"); err == nil {
		t.Fatal("get(expired) succeeded")
	} else {
		wantAPIError(t, err, 404, "session_not_found")
	}
	if _, err := os.Stat(filepath.Join(dir, "old.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("expired file still there: %v", err)
	}
	wantAPIError(t, s.delete("old"), 404, "session_not_found")
	_, err := s.acquireResponse(context.Background(), "resp_old")
	wantAPIError(t, err, 404, "previous_response_not_found")
	infos, err := s.list()
	if err != nil || len(infos) != 1 || infos[0].ID != "new" {
		t.Errorf("list() = %+v, %v; want only new", infos, err)
	}
	// Expiry survives a restart: mtimes carry the injected clock.
	clock.advance(23 * time.Hour)
	s2 := newTestSessionStore(t, dir, clock, 10, 0)
	if infos, _ := s2.list(); len(infos) != 0 {
		t.Errorf("list() after restart = %+v; want none", infos)
	}
	ss, err := s2.acquire(context.Background(), "new")
	if err != nil {
		t.Fatal(err)
	}
	defer ss.release()
	if got := peek(t, ss, userMsg("x")); got != "user:x" {
		t.Errorf("expired session reused: input = %s; want user:x", got)
	}
}

func TestSessionSerialized(t *testing.T) {
	s := newTestSessionStore(t, t.TempDir(), newFakeClock(), 10, 0)
	ctx := context.Background()
	first, err := s.acquire(ctx, "one")
	if err != nil {
		t.Fatal(err)
	}
	acquired := make(chan *session)
	go func() {
		ss, err := s.acquire(ctx, "one")
		if err != nil {
			t.Error(err)
		}
		acquired <- ss
	}()
	waitUsers(s, "one", 2)

	// Another session is not blocked by "one".
	other, err := s.acquire(ctx, "two")
	if err != nil {
		t.Fatal(err)
	}
	turnOut := []json.RawMessage{assistantMsg("m", "first")}
	sent, _ := other.input([]json.RawMessage{userMsg("two")})
	if err := other.commit(sent, turnOut, "resp_two", nil, 0); err != nil {
		t.Fatal(err)
	}
	other.release()

	select {
	case <-acquired:
		t.Fatal("second acquire of a held session returned before release")
	default:
	}
	sent, _ = first.input([]json.RawMessage{userMsg("a")})
	if err := first.commit(sent, turnOut, "resp_a", nil, 0); err != nil {
		t.Fatal(err)
	}
	first.release()
	second := <-acquired
	defer second.release()
	if got, want := peek(t, second), "user:a | assistant:first"; got != want {
		t.Errorf("second turn sees %s; want the first turn's commit %s", got, want)
	}
}

func TestSessionAcquireCancel(t *testing.T) {
	s := newTestSessionStore(t, t.TempDir(), newFakeClock(), 10, 0)
	held, err := s.acquire(context.Background(), "c")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		_, err := s.acquire(ctx, "c")
		done <- err
	}()
	waitUsers(s, "c", 2)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("acquire after cancel = %v; want context.Canceled", err)
	}
	held.release()
	ss, err := s.acquire(context.Background(), "c")
	if err != nil {
		t.Fatalf("acquire after release: %v", err)
	}
	ss.release()
}

func TestSessionCaps(t *testing.T) {
	t.Run("evicts oldest idle", func(t *testing.T) {
		dir, clock := t.TempDir(), newFakeClock()
		s := newTestSessionStore(t, dir, clock, 2, 0)
		for _, id := range []string{"a", "b"} {
			sessionTurn(t, s, id, []json.RawMessage{userMsg(id)}, nil, "resp_"+id)
			clock.advance(time.Minute)
		}
		sessionTurn(t, s, "a", []json.RawMessage{userMsg("a again")}, nil, "resp_a2") // b is now oldest
		clock.advance(time.Minute)
		sessionTurn(t, s, "c", []json.RawMessage{userMsg("c")}, nil, "resp_c")
		infos, err := s.list()
		var ids []string
		for _, in := range infos {
			ids = append(ids, in.ID)
		}
		if got, want := strings.Join(ids, ","), "c,a"; err != nil || got != want {
			t.Errorf("list() = %s, %v; want %s", got, err, want)
		}
		if _, err := os.Stat(filepath.Join(dir, "b.json")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("evicted session file remains: %v", err)
		}
		if _, err := os.Stat(filepath.Join(dir, "responses", "resp_b")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("evicted session's response index remains: %v", err)
		}
	})
	t.Run("429 when all busy", func(t *testing.T) {
		s := newTestSessionStore(t, t.TempDir(), newFakeClock(), 2, 0)
		for _, id := range []string{"a", "b"} {
			ss, err := s.acquire(context.Background(), id)
			if err != nil {
				t.Fatal(err)
			}
			defer ss.release()
		}
		_, err := s.acquire(context.Background(), "c")
		ae := wantAPIError(t, err, 429, "too_many_sessions")
		if ae.typ != "rate_limit_error" || !strings.Contains(ae.message, "--max-sessions") {
			t.Errorf("429 = %s %q; want rate_limit_error naming --max-sessions", ae.typ, ae.message)
		}
	})
	t.Run("413 on bytes", func(t *testing.T) {
		s := newTestSessionStore(t, t.TempDir(), newFakeClock(), 2, 300)
		sessionTurn(t, s, "big", []json.RawMessage{userMsg(strings.Repeat("x", 100))}, nil, "resp_1")
		ss, err := s.acquire(context.Background(), "big")
		if err != nil {
			t.Fatal(err)
		}
		defer ss.release()
		_, err = ss.input([]json.RawMessage{userMsg(strings.Repeat("y", 200))})
		ae := wantAPIError(t, err, 413, "session_too_large")
		if !strings.Contains(ae.message, "DELETE /codex/sessions/big") {
			t.Errorf("413 message %q does not say how to recover", ae.message)
		}
		if got, want := peek(t, ss), "user:"+strings.Repeat("x", 100); got != want {
			t.Errorf("transcript after 413 = %s; want unchanged", got)
		}
	})
}

func TestSessionFailedTurn(t *testing.T) {
	s := newTestSessionStore(t, t.TempDir(), newFakeClock(), 10, 0)
	sessionTurn(t, s, "f", []json.RawMessage{userMsg("one")}, []json.RawMessage{assistantMsg("m", "two")}, "resp_1")
	ss, err := s.acquire(context.Background(), "f")
	if err != nil {
		t.Fatal(err)
	}
	peek(t, ss, userMsg("lost"))
	ss.release() // upstream failed: no commit

	ss, err = s.acquire(context.Background(), "f")
	if err != nil {
		t.Fatal(err)
	}
	defer ss.release()
	if got, want := peek(t, ss, userMsg("retry")), "user:one | assistant:two | user:retry"; got != want {
		t.Errorf("input after failed turn = %s; want %s", got, want)
	}
	// A brand-new session whose first turn failed leaves nothing behind.
	ns, err := s.acquire(context.Background(), "never")
	if err != nil {
		t.Fatal(err)
	}
	ns.release()
	_, _, err = s.get("never")
	wantAPIError(t, err, 404, "session_not_found")
}

func TestSessionCrashSafe(t *testing.T) {
	dir, clock := t.TempDir(), newFakeClock()
	s := newTestSessionStore(t, dir, clock, 10, 0)
	sessionTurn(t, s, "good", []json.RawMessage{userMsg("keep me")}, nil, "resp_1")
	sessionTurn(t, s, "bad", []json.RawMessage{userMsg("x")}, nil, "resp_2")
	torn := filepath.Join(dir, "good.json.tmp123456")
	if err := os.WriteFile(torn, []byte(`{"id":"good","items":[{"ty`), 0o600); err != nil {
		t.Fatal(err)
	}
	corrupt := []byte(`{"id":"bad","created_at":1,"items":[{"type":"mess`)
	badPath := filepath.Join(dir, "bad.json")
	if err := os.WriteFile(badPath, corrupt, 0o600); err != nil {
		t.Fatal(err)
	}
	os.Chtimes(badPath, clock.now(), clock.now()) // not expired on the fake clock

	s2 := newTestSessionStore(t, dir, clock, 10, 0)
	if _, err := os.Stat(torn); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stray temp file not cleaned: %v", err)
	}
	_, items, err := s2.get("good")
	if err != nil || texts(items) != "user:keep me" {
		t.Errorf("get(good) = %s, %v; want the committed transcript", texts(items), err)
	}
	_, err = s2.acquire(context.Background(), "bad")
	ae := wantAPIError(t, err, 500, "session_unreadable")
	if !strings.Contains(ae.message, badPath) {
		t.Errorf("error %q does not name %s", ae.message, badPath)
	}
	if b, _ := os.ReadFile(badPath); string(b) != string(corrupt) {
		t.Errorf("corrupt file changed to %q", b)
	}
	_, _, err = s2.get("bad")
	wantAPIError(t, err, 500, "session_unreadable")
	_, err = s2.list()
	wantAPIError(t, err, 500, "session_unreadable")
}

func TestSessionCommitFailure(t *testing.T) {
	dir := t.TempDir()
	s := newTestSessionStore(t, dir, newFakeClock(), 10, 0)
	sessionTurn(t, s, "ro", []json.RawMessage{userMsg("one")}, nil, "resp_1")
	before, _ := os.ReadFile(filepath.Join(dir, "ro.json"))
	for _, d := range []string{dir, filepath.Join(dir, "responses")} {
		if err := os.Chmod(d, 0o500); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Chmod(d, 0o700) })
	}
	if f, err := os.CreateTemp(dir, "probe"); err == nil {
		f.Close()
		os.Remove(f.Name())
		t.Skip("directory permissions are not enforced (running as root?)")
	}
	ss, err := s.acquire(context.Background(), "ro")
	if err != nil {
		t.Fatal(err)
	}
	sent, _ := ss.input([]json.RawMessage{userMsg("two")})
	if err := ss.commit(sent, []json.RawMessage{assistantMsg("m", "x")}, "resp_2", nil, 0); err == nil {
		t.Fatal("commit into a read-only directory succeeded")
	}
	if got, want := peek(t, ss, userMsg("three")), "user:one | user:three"; got != want {
		t.Errorf("in-memory transcript after failed commit = %s; want %s", got, want)
	}
	ss.release()
	if after, _ := os.ReadFile(filepath.Join(dir, "ro.json")); string(after) != string(before) {
		t.Errorf("file changed by failed commit")
	}
}

func TestSessionPreviousResponse(t *testing.T) {
	s := newTestSessionStore(t, t.TempDir(), newFakeClock(), 10, 0)
	ctx := context.Background()
	sessionTurn(t, s, "main", []json.RawMessage{userMsg("q1")}, []json.RawMessage{assistantMsg("m1", "a1")}, "resp_1")
	sessionTurn(t, s, "main", []json.RawMessage{userMsg("q2")}, []json.RawMessage{assistantMsg("m2", "a2")}, "resp_2")

	t.Run("latest continues", func(t *testing.T) {
		ss, err := s.acquireResponse(ctx, "resp_2")
		if err != nil {
			t.Fatal(err)
		}
		defer ss.release()
		if ss.id() != "main" {
			t.Errorf("id() = %q; want main", ss.id())
		}
		if got, want := peek(t, ss, userMsg("q3")), "user:q1 | assistant:a1 | user:q2 | assistant:a2 | user:q3"; got != want {
			t.Errorf("input = %s; want %s", got, want)
		}
	})
	t.Run("branch forks", func(t *testing.T) {
		ss, err := s.acquireResponse(ctx, "resp_1")
		if err != nil {
			t.Fatal(err)
		}
		if ss.id() == "main" {
			t.Fatal("branch from resp_1 continued main")
		}
		sent, _ := ss.input([]json.RawMessage{userMsg("q2b")})
		if got, want := texts(sent), "user:q1 | assistant:a1 | user:q2b"; got != want {
			t.Errorf("fork input = %s; want %s", got, want)
		}
		if err := ss.commit(sent, []json.RawMessage{assistantMsg("m", "a2b")}, "resp_2b", nil, 0); err != nil {
			t.Fatal(err)
		}
		fork := ss.id()
		ss.release()
		ss, err = s.acquireResponse(ctx, "resp_2b")
		if err != nil {
			t.Fatal(err)
		}
		defer ss.release()
		if ss.id() != fork {
			t.Errorf("resp_2b continues %q; want the fork %q", ss.id(), fork)
		}
		_, items, _ := s.get("main")
		if got := len(items); got != 4 {
			t.Errorf("main has %d items after the fork; want 4", got)
		}
	})
	t.Run("unknown is 404", func(t *testing.T) {
		for _, id := range []string{"resp_nope", "../main.json", ""} {
			_, err := s.acquireResponse(ctx, id)
			ae := wantAPIError(t, err, 404, "previous_response_not_found")
			if want := "Previous response with id '" + id + "' not found."; ae.message != want || ae.param != "previous_response_id" || ae.typ != "invalid_request_error" {
				t.Errorf("err = %+v; want message %q", ae, want)
			}
		}
	})
	t.Run("fork released without commit vanishes", func(t *testing.T) {
		ss, err := s.acquireResponse(ctx, "resp_1")
		if err != nil {
			t.Fatal(err)
		}
		id := ss.id()
		ss.release()
		_, _, err = s.get(id)
		wantAPIError(t, err, 404, "session_not_found")
	})
}

func TestSessionListGetDelete(t *testing.T) {
	dir, clock := t.TempDir(), newFakeClock()
	s := newTestSessionStore(t, dir, clock, 10, 0)
	sessionTurn(t, s, "x", []json.RawMessage{userMsg("1")}, []json.RawMessage{assistantMsg("m", "2")}, "resp_x")
	clock.advance(time.Minute)
	sessionTurn(t, s, "y", []json.RawMessage{userMsg("3")}, nil, "resp_y")

	infos, err := s.list()
	if err != nil {
		t.Fatal(err)
	}
	want := []sessionInfo{
		{ID: "y", Object: "session", CreatedAt: clock.now().Unix(), LastUsedAt: clock.now().Unix(), ExpiresAt: clock.now().Add(24 * time.Hour).Unix(), Items: 1, Bytes: int64(len(userMsg("3"))), Responses: 1},
		{ID: "x", Object: "session", CreatedAt: clock.now().Add(-time.Minute).Unix(), LastUsedAt: clock.now().Add(-time.Minute).Unix(), ExpiresAt: clock.now().Add(24*time.Hour - time.Minute).Unix(), Items: 2, Bytes: int64(len(userMsg("1")) + len(stripped(assistantMsg("m", "2")))), Responses: 1},
	}
	if fmt.Sprint(infos) != fmt.Sprint(want) {
		t.Errorf("list() = %+v; want %+v", infos, want)
	}
	info, items, err := s.get("x")
	if err != nil || info != want[1] || texts(items) != "user:1 | assistant:2" {
		t.Errorf("get(x) = %+v, %s, %v; want %+v", info, texts(items), err, want[1])
	}
	busy, err := s.acquire(context.Background(), "x")
	if err != nil {
		t.Fatal(err)
	}
	wantAPIError(t, s.delete("x"), 409, "session_busy")
	busy.release()
	if err := s.delete("x"); err != nil {
		t.Fatalf("delete(x): %v", err)
	}
	_, _, err = s.get("x")
	wantAPIError(t, err, 404, "session_not_found")
	wantAPIError(t, s.delete("x"), 404, "session_not_found")
	wantAPIError(t, s.delete("nope"), 404, "session_not_found")
	_, err = s.acquireResponse(context.Background(), "resp_x")
	wantAPIError(t, err, 404, "previous_response_not_found")
	_, err = s.acquire(context.Background(), "../etc")
	ae := wantAPIError(t, err, 400, "")
	if ae.param != "session_id" {
		t.Errorf("bad id param = %q; want session_id", ae.param)
	}
	if _, err := os.Stat(filepath.Join(dir, "x.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("deleted file remains: %v", err)
	}
}

// Idle transcripts beyond the budget are dropped from memory and reloaded.
func TestSessionLoadedBudget(t *testing.T) {
	clock := newFakeClock()
	s := newTestSessionStore(t, t.TempDir(), clock, 10, 0)
	s.budget = 1
	sessionTurn(t, s, "a", []json.RawMessage{userMsg("a")}, nil, "resp_a")
	clock.advance(time.Second)
	sessionTurn(t, s, "b", []json.RawMessage{userMsg("b")}, nil, "resp_b")
	s.mu.Lock()
	n, sz := 0, s.loadedSz
	for _, ss := range s.index {
		if ss.data != nil {
			n++
		}
	}
	s.mu.Unlock()
	if n != 0 || sz != 0 {
		t.Errorf("loaded = %d sessions, %d bytes; want none with a 1-byte budget", n, sz)
	}
	ss, err := s.acquire(context.Background(), "a")
	if err != nil {
		t.Fatal(err)
	}
	defer ss.release()
	if got := peek(t, ss); got != "user:a" {
		t.Errorf("reloaded transcript = %s; want user:a", got)
	}
}

// benchItems builds a realistic transcript: user, reasoning and assistant
// items of about 300, 800 and 500 bytes.
func benchItems(turns int) []json.RawMessage {
	var items []json.RawMessage
	for i := range turns {
		items = append(items, userMsg(fmt.Sprintf("question %d: %s", i, strings.Repeat("please look at the code ", 11))),
			js(`{"type":"reasoning","summary":[{"type":"summary_text","text":"thinking"}],"encrypted_content":"gAAAA%s"}`, strings.Repeat("Qk9CQ", 145)),
			assistantMsg("", fmt.Sprintf("answer %d: %s", i, strings.Repeat("here is what I found ", 20))))
	}
	return items
}

func BenchmarkSessionTurn(b *testing.B) {
	base := benchItems(200)
	next := benchItems(1)
	// tmpfs separates this code's cost from the disk's: on a slow virtual
	// disk, creating and renaming files dominates.
	tmpfs := func(b *testing.B) string {
		d, err := os.MkdirTemp("/dev/shm", "ccproxy-bench")
		if err != nil {
			b.Skip("no /dev/shm")
		}
		b.Cleanup(func() { os.RemoveAll(d) })
		return d
	}
	disk := func(b *testing.B) string { return b.TempDir() }
	for _, bc := range []struct {
		name string
		cold bool
		dir  func(*testing.B) string
	}{
		{"warm", false, disk}, {"cold", true, disk}, {"warm-tmpfs", false, tmpfs}, {"cold-tmpfs", true, tmpfs},
	} {
		b.Run(bc.name, func(b *testing.B) {
			s := newTestSessionStore(b, bc.dir(b), newFakeClock(), 10, 0)
			if bc.cold {
				s.budget = 0 // every release drops the transcript; every acquire reads the file
			}
			reset := func() {
				if err := s.delete("bench"); err != nil && !strings.Contains(err.Error(), "not found") {
					b.Fatal(err)
				}
				sessionTurn(b, s, "bench", base[:len(base)-2], base[len(base)-2:], "resp_base")
			}
			reset()
			// ns/op includes the untimed-in-spirit reset; ns/turn is the turn
			// alone (Stop/StartTimer would stop the world every iteration).
			var spent time.Duration
			for i := range b.N {
				start := time.Now()
				ss, err := s.acquire(context.Background(), "bench")
				if err != nil {
					b.Fatal(err)
				}
				sent, err := ss.input(next[:1])
				if err != nil {
					b.Fatal(err)
				}
				if err := ss.commit(sent, next[1:], fmt.Sprint("resp_", i), nil, 0); err != nil {
					b.Fatal(err)
				}
				ss.release()
				spent += time.Since(start)
				reset() // keep the transcript at 200 turns
			}
			b.ReportMetric(float64(spent.Nanoseconds())/float64(b.N), "ns/turn")
		})
	}
}

// BenchmarkIdleSessions reports the heap a restarted store holds for 10,000
// idle sessions on disk after listing them.
func BenchmarkIdleSessions(b *testing.B) {
	const n = 10_000
	dir, clock := b.TempDir(), newFakeClock()
	items := benchItems(3)
	for i := range n {
		id := fmt.Sprintf("session-%05d", i)
		d := &sessionData{created: clock.now(), items: items, responses: map[string]int{"resp_" + id: len(items)}, latest: "resp_" + id}
		path := filepath.Join(dir, id+".json")
		if err := os.WriteFile(path, encodeSession(id, d), 0o600); err != nil {
			b.Fatal(err)
		}
		os.Chtimes(path, clock.now(), clock.now())
	}
	b.ResetTimer()
	for range b.N {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		s := newTestSessionStore(b, dir, clock, 0, 0)
		infos, err := s.list()
		if err != nil || len(infos) != n {
			b.Fatalf("list() = %d sessions, %v; want %d", len(infos), err, n)
		}
		infos = nil
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "heap-B/session")
		runtime.KeepAlive(s)
	}
}

// Root ignores permissions, so this failure uses a path that cannot be
// written by anyone: a directory where the response index file would go.
func TestSessionCommitFailureBlocked(t *testing.T) {
	dir := t.TempDir()
	s := newTestSessionStore(t, dir, newFakeClock(), 10, 0)
	sessionTurn(t, s, "blk", []json.RawMessage{userMsg("one")}, nil, "resp_1")
	before, _ := os.ReadFile(filepath.Join(dir, "blk.json"))
	if err := os.MkdirAll(filepath.Join(dir, "responses", "resp_2", "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	ss, err := s.acquire(context.Background(), "blk")
	if err != nil {
		t.Fatal(err)
	}
	defer ss.release()
	sent, _ := ss.input([]json.RawMessage{userMsg("two")})
	if err := ss.commit(sent, nil, "resp_2", nil, 0); err == nil {
		t.Fatal("commit succeeded with its index path blocked")
	}
	if got, want := peek(t, ss), "user:one"; got != want {
		t.Errorf("in-memory transcript after failed commit = %s; want %s", got, want)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, "blk.json")); string(after) != string(before) {
		t.Errorf("file changed by failed commit")
	}
}

// A session file in another layout (edited by hand, pretty-printed) is read
// by the general decoder; a truncated one is an error, not an empty session.
func TestSessionFileLayouts(t *testing.T) {
	tests := []struct {
		name, file string
		wantErr    bool
	}{
		{"pretty", "{\n  \"id\": \"h\",\n  \"responses\": {\"resp_1\": 1},\n  \"items\": [\n    {\"type\": \"message\", \"role\": \"user\",\n     \"content\": [{\"type\": \"input_text\", \"text\": \"hand\"}]}\n  ]\n}\n", false},
		{"truncated", "{\"id\":\"h\",\"item_count\":1,\"responses\":{\"resp_1\":1},\"items\":[\n{\"type\":\"message\"", true},
		{"wrong id", "{\"id\":\"other\",\"responses\":{},\"items\":[]}", true},
		{"response past the items", "{\"id\":\"h\",\"responses\":{\"resp_1\":2},\"items\":[{}]}", true},
		{"response id not a file name", "{\"id\":\"h\",\"responses\":{\"../h.json\":0},\"items\":[]}", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir, clock := t.TempDir(), newFakeClock()
			path := filepath.Join(dir, "h.json")
			if err := os.WriteFile(path, []byte(tc.file), 0o600); err != nil {
				t.Fatal(err)
			}
			os.Chtimes(path, clock.now(), clock.now())
			s := newTestSessionStore(t, dir, clock, 10, 0)
			_, items, err := s.get("h")
			if tc.wantErr {
				wantAPIError(t, err, 500, "session_unreadable")
				return
			}
			if err != nil || texts(items) != "user:hand" {
				t.Errorf("get(h) = %s, %v; want user:hand", texts(items), err)
			}
		})
	}
}

// FuzzSessionFile: no input makes parseSession panic, and a file it accepts
// survives a round trip through encodeSession unchanged.
func FuzzSessionFile(f *testing.F) {
	valid := encodeSession("h", &sessionData{created: time.Unix(1_800_000_000, 0),
		items:     []json.RawMessage{userMsg("hi"), reasoningItem("rs_1"), stripped(assistantMsg("m", "hello"))},
		responses: map[string]int{"resp_1": 1, "resp_2": 3}, latest: "resp_2"})
	f.Add(valid)
	f.Add(valid[:len(valid)/2]) // torn
	f.Add([]byte("\x00garbage{]"))
	f.Add([]byte(`{"id":"h","responses":{"r":5},"items":[{}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := parseSession(b, "h")
		if err != nil {
			return
		}
		again, err := parseSession(encodeSession("h", d), "h")
		if err != nil {
			t.Fatalf("re-encoded file rejected: %v\n%s", err, encodeSession("h", d))
		}
		if !slices.EqualFunc(d.items, again.items, func(a, b json.RawMessage) bool { return bytes.Equal(a, b) }) || !maps.Equal(d.responses, again.responses) ||
			d.latest != again.latest || !d.created.Equal(again.created) {
			t.Errorf("round trip changed the session:\n%+v\n%+v", d, again)
		}
	})
}

// TestSessionTurnWithoutResponseID: a sparse response.completed without an
// id is still saved, and an earlier response id then forks instead of
// continuing past the unnamed turn.
func TestSessionTurnWithoutResponseID(t *testing.T) {
	s := newTestSessionStore(t, t.TempDir(), newFakeClock(), 10, 1<<20)
	sessionTurn(t, s, "x", []json.RawMessage{userMsg("one")}, []json.RawMessage{assistantMsg("m1", "a")}, "resp_1")
	sessionTurn(t, s, "x", []json.RawMessage{userMsg("two")}, []json.RawMessage{assistantMsg("m2", "b")}, "")
	if _, items, err := s.get("x"); err != nil || len(items) != 4 {
		t.Fatalf("get = %d items, %v; want the unnamed turn saved (4 items)", len(items), err)
	}
	ss, err := s.acquireResponse(context.Background(), "resp_1")
	if err != nil {
		t.Fatal(err)
	}
	defer ss.release()
	if ss.id() == "x" {
		t.Errorf("previous_response_id resp_1 continued session x past a later turn; want a fork")
	}
	if sent, _ := ss.input(nil); len(sent) != 2 {
		t.Errorf("history behind resp_1 has %d items; want 2", len(sent))
	}
}

// stripped is an item as a session stores it.
func stripped(item json.RawMessage) json.RawMessage {
	b, _ := stripID(item)
	return b
}

// TestSessionCommitLeavesNoDebris: a commit that fails after writing its index files removes
// them again.
func TestSessionCommitLeavesNoDebris(t *testing.T) {
	dir := t.TempDir()
	s := newTestSessionStore(t, dir, newFakeClock(), 10, 0)
	ss, err := s.acquire(context.Background(), "d")
	if err != nil {
		t.Fatal(err)
	}
	defer ss.release()
	// The session file cannot be written: a directory stands where it goes.
	if err := os.MkdirAll(filepath.Join(dir, "d.json", "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	sent, _ := ss.input([]json.RawMessage{userMsg("hi")})
	if err := ss.commit(sent, []json.RawMessage{reasoningItem("rs_1"), assistantMsg("msg_1", "hello")}, "resp_1", []byte(`{}`), 1); err == nil {
		t.Fatal("commit succeeded")
	}
	if left, _ := os.ReadDir(filepath.Join(dir, "responses")); len(left) != 0 {
		t.Errorf("index files left behind: %v", left)
	}
}

// BenchmarkExpand measures what a turn that refers to a 200-turn history costs before the
// upstream call: an item_reference to its last reply, and a previous_response_id to it.
//
//	go test -run '^$' -bench Expand -benchmem
func BenchmarkExpand(b *testing.B) {
	dir := b.TempDir()
	clock := newFakeClock()
	s := newTestSessionStore(b, dir, clock, 10, 0)
	items := benchItems(200)
	ss, _ := s.acquire(context.Background(), "h")
	sent, _ := ss.input(items[:len(items)-1])
	if err := ss.commit(sent, []json.RawMessage{assistantMsg("msg_last", "last")}, "resp_last", []byte(`{}`), len(sent)); err != nil {
		b.Fatal(err)
	}
	ss.release()
	b.Run("item_reference", func(b *testing.B) {
		in := []json.RawMessage{js(`{"type":"item_reference","id":"msg_last"}`), userMsg("next")}
		for b.Loop() {
			if out, err := s.expand(in); err != nil || len(out) != 2 {
				b.Fatal(err)
			}
		}
	})
	b.Run("item_reference, after a restart", func(b *testing.B) {
		in := []json.RawMessage{js(`{"type":"item_reference","id":"msg_last"}`), userMsg("next")}
		for b.Loop() {
			cold := newTestSessionStore(b, dir, clock, 10, 0)
			if _, err := cold.expand(in); err != nil {
				b.Fatal(err)
			}
		}
	})
	// The Vercel AI SDK names every earlier item by reference: 100 of them in one session.
	var outputs, refs []json.RawMessage
	for i := range 100 {
		outputs = append(outputs, assistantMsg(fmt.Sprintf("msg_v%d", i), "answer"))
		refs = append(refs, js(`{"type":"item_reference","id":"msg_v%d"}`, i))
	}
	ss, _ = s.acquire(context.Background(), "v")
	sent, _ = ss.input(items[:len(items)-1])
	if err := ss.commit(sent, outputs, "resp_v", []byte(`{}`), len(sent)); err != nil {
		b.Fatal(err)
	}
	ss.release()
	b.Run("100 item_references, after a restart", func(b *testing.B) {
		for b.Loop() {
			cold := newTestSessionStore(b, dir, clock, 10, 0)
			if out, err := cold.expand(refs); err != nil || len(out) != 100 {
				b.Fatal(err)
			}
		}
	})
	b.Run("previous_response_id", func(b *testing.B) {
		for b.Loop() {
			ss, err := s.acquireResponse(context.Background(), "resp_last")
			if err != nil {
				b.Fatal(err)
			}
			if _, err := ss.input([]json.RawMessage{userMsg("next")}); err != nil {
				b.Fatal(err)
			}
			ss.release()
		}
	})
}
