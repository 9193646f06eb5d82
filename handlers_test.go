package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/metrics"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"
)

// backendModels is what the fake backend accepts and lists.
var backendModels = []string{"gpt-5.5", "gpt-5.4", "gpt-5.1-codex"}

// fakeBackend plays the Codex backend. It enforces the request rules the real
// backend enforces with 400s, and answers each accepted
// turn with reply, which writes SSE events.
type fakeBackend struct {
	*httptest.Server
	token  string // the access token it accepts
	mu     sync.Mutex
	bodies []map[string]any
	heads  []http.Header
	reply  func(w http.ResponseWriter, r *http.Request, body map[string]any)
}

// newFakeBackend starts a fake backend answering every turn with reply.
func newFakeBackend(t testing.TB, reply func(w http.ResponseWriter, r *http.Request, body map[string]any)) *fakeBackend {
	t.Helper()
	fb := &fakeBackend{reply: reply, token: testAccessToken}
	fb.Server = httptest.NewServer(http.HandlerFunc(fb.serve))
	t.Cleanup(fb.Close)
	return fb
}

func (fb *fakeBackend) serve(w http.ResponseWriter, r *http.Request) {
	fb.mu.Lock()
	token := fb.token
	fb.mu.Unlock()
	if r.Header.Get("Authorization") != "Bearer "+token || r.Header.Get("Chatgpt-Account-Id") != testAccountID {
		w.WriteHeader(401)
		io.WriteString(w, `{"detail":"Unauthorized"}`)
		return
	}
	if r.Method == "GET" && r.URL.Path == "/models" {
		var models []map[string]any
		for _, m := range backendModels {
			models = append(models, map[string]any{"slug": m, "visibility": "list", "base_instructions": "You are Codex, " + m})
		}
		models = append(models, map[string]any{"slug": "codex-auto-review", "visibility": "hide"})
		json.NewEncoder(w).Encode(map[string]any{"models": models})
		return
	}
	var body map[string]any
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		http.Error(w, `{"detail":"bad json"}`, 400)
		return
	}
	fb.mu.Lock()
	fb.bodies = append(fb.bodies, body)
	fb.heads = append(fb.heads, r.Header.Clone())
	fb.mu.Unlock()
	if msg := backendRejects(body, r.Header); msg != "" {
		w.WriteHeader(400)
		io.WriteString(w, msg)
		return
	}
	fb.reply(w, r, body)
}

// fixtureModels is the model catalog of the Codex CLI 0.169.0 (testdata/codex-cli/models.json),
// by slug, plus gpt-5.3-codex-spark as 2026-07 reports describe it.
var fixtureModels = func() map[string]catalogModel {
	var cc cachedCatalog
	b, err := os.ReadFile("testdata/codex-cli/models.json")
	if err != nil || json.Unmarshal(b, &cc) != nil {
		panic(fmt.Sprintf("testdata/codex-cli/models.json: %v", err))
	}
	m := map[string]catalogModel{"gpt-5.3-codex-spark": {Slug: "gpt-5.3-codex-spark", Summary: new(bool), Modalities: []string{"text"}}}
	for _, model := range cc.Models {
		m[model.Slug] = model
	}
	return m
}()

// backendRejects returns the real backend's error body for a request it would refuse, or "":
// the rules of 2025-2026 that the Codex CLI's own requests follow.
func backendRejects(body map[string]any, h http.Header) string {
	detail := func(s string) string { b, _ := json.Marshal(map[string]string{"detail": s}); return string(b) }
	param := func(p, msg string) string {
		b, _ := json.Marshal(map[string]any{"error": map[string]any{"message": msg, "type": "invalid_request_error", "param": p, "code": "unsupported_value"}})
		return string(b)
	}
	if body["stream"] != true {
		return detail("Stream must be set to true")
	}
	if body["store"] != false {
		return detail("Store must be set to false")
	}
	for k := range body {
		if !slices.Contains([]string{"model", "instructions", "input", "tools", "tool_choice", "parallel_tool_calls",
			"reasoning", "store", "stream", "include", "prompt_cache_key", "text", "client_metadata", "service_tier"}, k) {
			return detail("Unsupported parameter: " + k)
		}
	}
	if tier, ok := body["service_tier"].(string); ok && tier != "priority" && tier != "default" {
		return detail("Unsupported service_tier: " + tier)
	}
	model, _ := body["model"].(string)
	m, known := fixtureModels[model]
	if !known && !slices.Contains(backendModels, model) {
		return detail(fmt.Sprintf("The '%v' model is not supported when using Codex with a ChatGPT account.", body["model"]))
	}
	lite := h.Get("X-Openai-Internal-Codex-Responses-Lite") == "true"
	switch {
	case lite && !m.Lite:
		return detail("This model is not supported when using X-OpenAI-Internal-Codex-Responses-Lite.")
	case !lite && m.Lite:
		return detail("The '" + model + "' model requires the Responses Lite request format.")
	case lite && body["parallel_tool_calls"] != false:
		return detail("X-OpenAI-Internal-Codex-Responses-Lite requires `parallel_tool_calls` to be false.")
	case lite && jsonPath(body, "reasoning", "context") != "all_turns":
		return param("reasoning.context", "Unsupported value: reasoning.context must be 'all_turns'.")
	case lite && body["tools"] != nil:
		return detail("Unsupported parameter: tools")
	case m.Summary != nil && !*m.Summary && jsonPath(body, "reasoning", "summary") != nil:
		return param("reasoning.summary", "Unsupported parameter: 'reasoning.summary' is not supported with this model.")
	}
	if effort, ok := jsonPath(body, "reasoning", "effort").(string); ok && m.Efforts != nil && !slices.Contains(m.efforts(), effort) {
		return param("reasoning.effort", fmt.Sprintf("Unsupported value: '%s' is not supported with the '%s' model.", effort, model))
	}
	return rejectsItems(body, m)
}

// rejectsItems checks the input items and tools of an upstream body.
func rejectsItems(body map[string]any, m catalogModel) string {
	detail := func(s string) string { b, _ := json.Marshal(map[string]string{"detail": s}); return string(b) }
	items, _ := body["input"].([]any)
	for i, it := range items {
		item := it.(map[string]any)
		if item["role"] == "system" {
			return detail("System messages are not allowed")
		}
		if id, ok := item["id"].(string); ok && !strings.HasPrefix(id, "msg_") {
			return fmt.Sprintf(`{"error":{"message":"Item with id '%s' not found. Items are not persisted when `+"`store`"+` is set to false.","type":"invalid_request_error","param":"input","code":null}}`, id)
		}
		if item["type"] == "additional_tools" && i != 0 {
			return detail("additional_tools must be the first input item")
		}
		parts, _ := item["content"].([]any)
		for _, p := range parts {
			part, _ := p.(map[string]any)
			for _, k := range []string{"cache_control", "prompt_cache_breakpoint"} {
				if part[k] != nil {
					return detail("Unsupported parameter: input.content." + k)
				}
			}
			if part["type"] == "input_image" && m.Modalities != nil && !slices.Contains(m.Modalities, "image") {
				return detail("This model does not support image input.")
			}
		}
	}
	calls, outputs := map[string]bool{}, map[string]bool{}
	for _, it := range items {
		item := it.(map[string]any)
		id, _ := item["call_id"].(string)
		switch item["type"] {
		case "function_call", "custom_tool_call":
			calls[id] = true
		case "function_call_output", "custom_tool_call_output":
			if !calls[id] {
				return fmt.Sprintf(`{"error":{"message":"No tool call found for function call output with call_id %s.","type":"invalid_request_error","param":"input","code":null}}`, id)
			}
			outputs[id] = true
		}
	}
	for id := range calls {
		if !outputs[id] {
			return detail("No tool output found for function call " + id + ".")
		}
	}
	tools, _ := body["tools"].([]any)
	for i, tl := range tools {
		tool := tl.(map[string]any)
		if tool["type"] == "function" && tool["name"] == nil {
			return fmt.Sprintf(`{"error":{"message":"Missing required parameter: 'tools[%d].name'.","type":"invalid_request_error","param":"tools[%d].name","code":"missing_required_parameter"}}`, i, i)
		}
	}
	return ""
}

// sse formats one backend event the way the backend does.
func sse(typ string, fields map[string]any) string {
	fields["type"] = typ
	b, _ := json.Marshal(fields)
	return "event: " + typ + "\ndata: " + string(b) + "\n\n"
}

// textReply is the backend's plain-text event sequence,
// one delta per element of parts, with the response id respID.
func textReply(respID string, parts ...string) []string {
	text := strings.Join(parts, "")
	msg := map[string]any{"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
		"content": []any{map[string]any{"type": "output_text", "annotations": []any{}, "text": text}}}
	evs := []string{
		sse("response.created", map[string]any{"response": map[string]any{"id": respID, "status": "in_progress", "output": []any{}}}),
		sse("response.output_item.added", map[string]any{"output_index": 0, "item": map[string]any{"id": "msg_1", "type": "message", "role": "assistant", "content": []any{}}}),
	}
	for _, p := range parts {
		evs = append(evs, sse("response.output_text.delta", map[string]any{"item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": p}))
	}
	return append(evs,
		sse("response.output_item.done", map[string]any{"output_index": 0, "item": msg}),
		sse("response.completed", map[string]any{"response": map[string]any{"id": respID, "status": "completed", "output": []any{msg},
			"usage": map[string]any{"input_tokens": 10, "input_tokens_details": map[string]any{"cached_tokens": 4}, "output_tokens": 5,
				"output_tokens_details": map[string]any{"reasoning_tokens": 2}, "total_tokens": 15}}}))
}

// writeEvents streams events, flushing each one.
func writeEvents(w http.ResponseWriter, events []string) {
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("X-Codex-Plan-Type", "plus")
	w.Header().Set("X-Codex-Primary-Used-Percent", "12")
	w.Header().Set("X-Codex-Primary-Window-Minutes", "300")
	w.Header().Set("X-Codex-Credits-Has-Credits", "False")
	w.Header().Set("X-Codex-Credits-Balance", "0")
	for _, e := range events {
		io.WriteString(w, e)
		http.NewResponseController(w).Flush()
	}
}

// Test credentials: a Codex CLI auth.json whose access token is valid for a
// long time, so no refresh happens unless a test wants one.
const (
	testAccountID = "532cfd8b-7b79-49b5-a51e-858c96e5b053"
)

var testAccessToken = testJWT(map[string]any{"exp": time.Now().Add(240 * time.Hour).Unix(),
	"https://api.openai.com/auth": map[string]any{"chatgpt_account_id": testAccountID, "chatgpt_plan_type": "plus"}})

// testJWT builds an unsigned JWT with the given claims.
func testJWT(claims map[string]any) string {
	enc := base64.RawURLEncoding.EncodeToString
	payload, _ := json.Marshal(claims)
	return enc([]byte(`{"alg":"RS256","typ":"JWT"}`)) + "." + enc(payload) + ".c2ln"
}

// writeCodexAuth writes a Codex CLI credential file into dir.
func writeCodexAuth(t testing.TB, dir string) {
	t.Helper()
	idToken := testJWT(map[string]any{"email": "alice@example.com", "exp": time.Now().Add(time.Hour).Unix(),
		"https://api.openai.com/auth": map[string]any{"chatgpt_account_id": testAccountID, "chatgpt_plan_type": "plus"}})
	b, _ := json.MarshalIndent(map[string]any{"OPENAI_API_KEY": nil, "tokens": map[string]any{
		"id_token": idToken, "access_token": testAccessToken, "refresh_token": "rt_test", "account_id": testAccountID},
		"last_refresh": time.Now().UTC().Format(time.RFC3339Nano)}, "", "  ")
	os.MkdirAll(dir, 0o700)
	if err := os.WriteFile(filepath.Join(dir, "auth.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// proxy is a ccproxy handler wired to a fake backend, with its log.
type proxy struct {
	*httptest.Server
	log      *bytes.Buffer
	cfg      config
	up       *upstream
	sessions *sessionStore
}

// newProxy serves ccproxy in front of fb with a fresh state directory.
func newProxy(t testing.TB, fb *fakeBackend, opts ...func(*config)) *proxy {
	t.Helper()
	dir := t.TempDir()
	writeCodexAuth(t, filepath.Join(dir, "codex"))
	cfg := config{host: "127.0.0.1", upstreamURL: fb.URL, authURL: "http://127.0.0.1:1", reasoning: reasoningTags,
		instructions: instructions{mode: "auto"}, sessionTTL: time.Hour, maxSessions: 100, maxSessionBytes: 1 << 20, codexEnabled: true,
		home: filepath.Join(dir, "ccproxy"), authPath: filepath.Join(dir, "codex", "auth.json"), keepalive: time.Hour,
		maxInflight: 4 * maxBodyBytes, bodyTimeout: time.Minute, claude: claudeModels{"opus": "gpt-6.1-sol", "sonnet": "gpt-6-sol", "haiku": "gpt-6-luna"}, imageModel: "gpt-5.5",
		logLevel: slog.LevelDebug} // debug: tests check that not even debug lines carry secrets
	for _, o := range opts {
		o(&cfg)
	}
	var log bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&syncWriter{w: &log}, &slog.HandlerOptions{Level: cfg.logLevel}))
	auth := newAuthStore(cfg.authPath, cfg.authURL, http.DefaultClient, time.Now)
	sessions, err := newSessionStore(filepath.Join(cfg.home, "sessions"), cfg.sessionTTL, cfg.maxSessions, cfg.maxSessionBytes, time.Now)
	if err != nil {
		t.Fatal(err)
	}
	up := newUpstream(cfg.upstreamURL, auth, fb.Client())
	up.backoff = time.Millisecond
	srv := httptest.NewServer(newServer(logger, cfg, auth, sessions, up, newCatalog(up, filepath.Join(cfg.home, "models.json"), time.Now)))
	t.Cleanup(srv.Close)
	return &proxy{Server: srv, log: &log, cfg: cfg, up: up, sessions: sessions}
}

// syncWriter serializes writes to a shared log buffer.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(b)
}

// post sends a JSON body and returns the response with its body read.
func (p *proxy) post(t *testing.T, path, body string, header ...string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest("POST", p.URL+path, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b)
}

// jsonPath digs into decoded JSON: jsonPath(v, "choices", 0, "message").
func jsonPath(v any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, _ := v.(map[string]any)
			v = m[k]
		case int:
			a, _ := v.([]any)
			if k >= len(a) {
				return nil
			}
			v = a[k]
		}
	}
	return v
}

// decode parses a JSON body or fails the test.
func decode(t *testing.T, body string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(body), &m); err != nil {
		t.Fatalf("body is not JSON: %v\n%s", err, body)
	}
	return m
}

func TestChatCompletion(t *testing.T) {
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		writeEvents(w, textReply("resp_1", "Hel", "lo"))
	})
	p := newProxy(t, fb)
	resp, body := p.post(t, "/codex/v1/chat/completions", `{"model":"gpt-5.5","temperature":0.2,"max_tokens":10,
		"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}`,
		"Authorization", "Bearer client-junk", "Cookie", "c=1")
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	got := decode(t, body)
	if c := jsonPath(got, "choices", 0, "message", "content"); c != "Hello" {
		t.Errorf("content = %v; want Hello", c)
	}
	if f := jsonPath(got, "choices", 0, "finish_reason"); f != "stop" {
		t.Errorf("finish_reason = %v; want stop", f)
	}
	if u := jsonPath(got, "usage", "prompt_tokens_details", "cached_tokens"); u != 4.0 {
		t.Errorf("cached tokens = %v; want 4", u)
	}
	if ig := resp.Header.Get("X-Ccproxy-Ignored-Params"); !strings.Contains(ig, "temperature") || !strings.Contains(ig, "max_tokens") {
		t.Errorf("X-Ccproxy-Ignored-Params = %q; want temperature and max_tokens", ig)
	}
	if resp.Header.Get("X-Codex-Plan-Type") != "plus" {
		t.Errorf("x-codex-* headers not passed through: %v", resp.Header)
	}
	up := fb.bodies[0]
	if jsonPath(up, "input", 0, "role") != "developer" || up["prompt_cache_key"] != resp.Header.Get("X-Session-Id") {
		t.Errorf("upstream body %v; want the system message as developer and prompt_cache_key = session id", up)
	}
	if h := fb.heads[0]; h.Get("Authorization") != "Bearer "+testAccessToken || h.Get("Cookie") != "" || h.Get("Session-Id") != resp.Header.Get("X-Session-Id") {
		t.Errorf("upstream headers %v: inbound cookie forwarded or session-id missing", h)
	}
	for _, secret := range []string{testAccessToken, "client-junk", "rt_test"} {
		if strings.Contains(p.log.String(), secret) {
			t.Errorf("log contains a secret %.20q…", secret)
		}
	}
}

// readSSE returns a function yielding the data of each event of body.
func readSSE(t *testing.T, body io.Reader) func() (string, bool) {
	rd := newSSEReader(body)
	return func() (string, bool) {
		_, data, err := rd.next()
		if err != nil {
			return "", false
		}
		return string(data), true
	}
}

// TestChatStreamFlushesEachDelta proves per-event flushing: the backend
// holds back its second delta until the client has read the first.
func TestChatStreamFlushesEachDelta(t *testing.T) {
	firstRead := make(chan struct{})
	events := textReply("resp_1", "Hel", "lo")
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		writeEvents(w, events[:3]) // created, item added, first delta
		select {
		case <-firstRead:
		case <-r.Context().Done():
			return
		}
		writeEvents(w, events[3:])
	})
	p := newProxy(t, fb)
	resp, err := http.Post(p.URL+"/codex/v1/chat/completions", "application/json",
		strings.NewReader(`{"model":"gpt-5.5","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	next := readSSE(t, resp.Body)
	var content strings.Builder
	var finishes, usage int
	done := false
	for {
		data, ok := next()
		if !ok {
			break
		}
		if data == "[DONE]" {
			done = true
			continue
		}
		chunk := decode(t, data)
		if c, ok := jsonPath(chunk, "choices", 0, "delta", "content").(string); ok {
			content.WriteString(c)
			if c == "Hel" {
				close(firstRead)
			}
		}
		if jsonPath(chunk, "choices", 0, "finish_reason") != nil {
			finishes++
		}
		if jsonPath(chunk, "usage", "total_tokens") == 15.0 {
			usage++
		}
	}
	if content.String() != "Hello" || finishes != 1 || usage != 1 || !done {
		t.Errorf("content %q, %d finish chunks, %d usage chunks, [DONE] %v; want Hello, 1, 1, true", content.String(), finishes, usage, done)
	}
}

// TestClientCancelReachesBackend closes the client mid-stream and waits for
// the backend's request context to end.
func TestClientCancelReachesBackend(t *testing.T) {
	canceled := make(chan struct{})
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		writeEvents(w, textReply("resp_1", "Hel")[:3])
		<-r.Context().Done()
		close(canceled)
	})
	p := newProxy(t, fb)
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "POST", p.URL+"/codex/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-5.5","stream":true,"messages":[{"role":"user","content":"hi"}]}`))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	next := readSSE(t, resp.Body)
	for {
		data, ok := next()
		if !ok {
			t.Fatal("stream ended before the first delta")
		}
		if strings.Contains(data, "Hel") {
			break
		}
	}
	cancel()
	resp.Body.Close()
	<-canceled // the test times out if the cancellation never reaches the backend
}

func TestStreamFailures(t *testing.T) {
	tests := []struct {
		name       string
		events     []string
		wantErr    string
		wantStatus int // 200 once the answer has begun; before that, an HTTP error
	}{
		{"closed mid-stream", textReply("resp_1", "Hel")[:3], "stream closed before response.completed", 200},
		{"cut mid-event", append(textReply("resp_1", "Hel")[:3], "event: response.output_text.delta\ndata: {\"del"), "upstream_stream_error", 200},
		{"garbage", []string{"\x00\x01 not sse at all\n\n"}, "upstream_stream_error", 502},
		{"response.failed", append(textReply("resp_1", "Hel")[:3], sse("response.failed", map[string]any{"response": map[string]any{
			"id": "resp_1", "status": "failed", "error": map[string]any{"code": "context_length_exceeded", "message": "Your input exceeds the context window"}}})),
			"Your input exceeds the context window", 200},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) { writeEvents(w, tc.events) })
			p := newProxy(t, fb)
			for _, path := range []string{"/codex/v1/chat/completions", "/codex/v1/responses"} {
				resp, body := p.post(t, path, `{"model":"gpt-5.5","stream":true,"messages":[{"role":"user","content":"hi"}]}`)
				if path == "/codex/v1/responses" {
					resp, body = p.post(t, path, `{"model":"gpt-5.5","stream":true,"input":"hi"}`)
				}
				if resp.StatusCode != tc.wantStatus || !strings.Contains(body, tc.wantErr) || !strings.Contains(body, `"error":{`) {
					t.Errorf("%s: status %d, body:\n%s\nwant %d with an error naming %q", path, resp.StatusCode, body, tc.wantStatus, tc.wantErr)
				}
				if strings.Contains(body, "[DONE]") || strings.Contains(body, "event: response.completed") {
					t.Errorf("%s: a failed stream ended cleanly:\n%s", path, body)
				}
				// Without streaming the same failure is an HTTP error.
				resp, body = p.post(t, path, `{"model":"gpt-5.5","messages":[{"role":"user","content":"hi"}]}`)
				if resp.StatusCode < 400 || !strings.Contains(body, `"error":{`) {
					t.Errorf("%s non-stream: status %d body %s; want an error", path, resp.StatusCode, body)
				}
			}
		})
	}
}

func TestKeepalive(t *testing.T) {
	release := make(chan struct{})
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		events := textReply("resp_1", "ok")
		writeEvents(w, events[:2])
		select { // long reasoning: silence until the client saw a keepalive
		case <-release:
		case <-r.Context().Done():
			return
		}
		writeEvents(w, events[2:])
	})
	p := newProxy(t, fb, func(c *config) { c.keepalive = 5 * time.Millisecond })
	resp, err := http.Post(p.URL+"/codex/v1/chat/completions", "application/json",
		strings.NewReader(`{"model":"gpt-5.5","stream":true,"messages":[{"role":"user","content":"hi"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("stream ended without a keepalive: %v", err)
		}
		if line == ": keepalive\n" {
			break
		}
	}
	close(release)
	rest, _ := io.ReadAll(br)
	if !strings.Contains(string(rest), `"content":"ok"`) || !strings.HasSuffix(string(rest), "data: [DONE]\n\n") {
		t.Errorf("after the keepalive: %s; want the answer and [DONE]", rest)
	}
}

func TestUpstreamErrorsReachClient(t *testing.T) {
	usage := `{"error":{"type":"usage_limit_reached","message":"The usage limit has been reached","plan_type":"plus","resets_at":1776672030,"resets_in_seconds":17778}}`
	tests := []struct {
		name       string
		status     int
		body       string
		wantStatus int
		want       []string
	}{
		{"usage limit", 429, usage, 429, []string{`"type":"rate_limit_error"`, "usage_limit_reached", "resets at"}},
		{"bad effort relayed", 400, `{"error":{"message":"Unsupported value: 'none' is not supported with the 'gpt-5.1-codex' model.","type":"invalid_request_error","param":"reasoning.effort","code":"unsupported_value"}}`,
			400, []string{"Unsupported value: 'none'", `"param":"reasoning.effort"`}},
		{"5xx retried then 502", 500, `{"detail":"oops"}`, 502, []string{"the Codex backend failed (HTTP 500)"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			calls := 0
			fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
				calls++
				if tc.status == 429 {
					w.Header().Set("X-Codex-Primary-Used-Percent", "100")
				}
				w.WriteHeader(tc.status)
				io.WriteString(w, tc.body)
			})
			p := newProxy(t, fb)
			resp, body := p.post(t, "/codex/v1/chat/completions", `{"model":"gpt-5.5","messages":[{"role":"user","content":"hi"}]}`)
			if resp.StatusCode != tc.wantStatus {
				t.Errorf("status %d; want %d (%s)", resp.StatusCode, tc.wantStatus, body)
			}
			for _, w := range tc.want {
				if !strings.Contains(body, w) {
					t.Errorf("body %s; want %q", body, w)
				}
			}
			if tc.status == 429 && (resp.Header.Get("Retry-After") != "17778" || resp.Header.Get("X-Codex-Primary-Used-Percent") != "100") {
				t.Errorf("headers %v; want Retry-After 17778 and the x-codex headers", resp.Header)
			}
			if want := map[bool]string{true: "false"}[tc.wantStatus < 500 && tc.wantStatus != 429]; resp.Header.Get("X-Should-Retry") != want {
				t.Errorf("X-Should-Retry %q; want %q", resp.Header.Get("X-Should-Retry"), want)
			}
			if tc.status == 500 && calls != 4 {
				t.Errorf("backend called %d times; want 4 (3 retries)", calls)
			}
		})
	}
}

func TestBadRequests(t *testing.T) {
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		writeEvents(w, textReply("resp_1", "ok"))
	})
	p := newProxy(t, fb)
	tests := []struct {
		name, method, path, body string
		wantStatus               int
		want                     string
	}{
		{"bad json", "POST", "/codex/v1/chat/completions", `{"model":`, 400, `"type":"invalid_request_error"`},
		{"missing model", "POST", "/codex/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}]}`, 400, `"param":"model"`},
		{"missing messages", "POST", "/codex/v1/chat/completions", `{"model":"gpt-5.5"}`, 400, `"param":"messages"`},
		{"n > 1", "POST", "/codex/v1/chat/completions", `{"model":"gpt-5.5","n":2,"messages":[{"role":"user","content":"hi"}]}`, 400, `"param":"n"`},
		{"missing input", "POST", "/codex/v1/responses", `{"model":"gpt-5.5"}`, 400, `"param":"input"`},
		{"unknown model relayed", "POST", "/codex/v1/chat/completions", `{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}`, 400, "not supported when using Codex with a ChatGPT account"},
		{"oversized body", "POST", "/codex/v1/chat/completions", `{"model":"gpt-5.5","messages":[{"role":"user","content":"` + strings.Repeat("x", maxBodyBytes) + `"}]}`, 413, "request_too_large"},
		{"deeply nested", "POST", "/codex/v1/chat/completions", `{"model":"gpt-5.5","messages":` + strings.Repeat("[", 100000), 400, `"type":"invalid_request_error"`},
		{"unknown route", "GET", "/v1/nothing", "", 404, `"code":"not_found"`},
		{"wrong method", "GET", "/codex/v1/chat/completions", "", 405, `"code":"method_not_allowed"`},
		{"unknown session", "GET", "/codex/sessions/nope", "", 404, "Session not found"},
		{"unknown previous response", "POST", "/codex/v1/responses", `{"model":"gpt-5.5","input":"hi","previous_response_id":"resp_zzz"}`, 404, "Previous response with id 'resp_zzz' not found."},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, p.URL+tc.path, strings.NewReader(tc.body))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.wantStatus || !strings.Contains(string(b), tc.want) {
				t.Errorf("%d %s; want %d with %q", resp.StatusCode, b, tc.wantStatus, tc.want)
			}
			if resp.Header.Get("X-Request-Id") == "" || resp.Header.Get("Content-Type") != "application/json" {
				t.Errorf("headers %v; want X-Request-Id and JSON", resp.Header)
			}
			if resp.Header.Get("Access-Control-Allow-Origin") != "" {
				t.Error("CORS header present; want none")
			}
		})
	}
}

func TestForeignHostRefused(t *testing.T) {
	fb := newFakeBackend(t, nil)
	p := newProxy(t, fb)
	for host, want := range map[string]int{"evil.example": 403, "localhost:8000": 200, "127.0.0.1": 200, "[::1]:8000": 200} {
		req, _ := http.NewRequest("GET", p.URL+"/health", nil)
		req.Host = host
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("Host %s: status %d; want %d", host, resp.StatusCode, want)
		}
	}
}

// TestSessionsRemember is the Alice example through both APIs: the
// second turn's upstream input carries the first exchange.
func TestSessionsRemember(t *testing.T) {
	tests := []struct {
		name, path string
		header     []string
		body       func(msg string) string
	}{
		{"chat by path", "/codex/alice/chat/completions", nil, func(m string) string {
			return `{"model":"gpt-5.5","messages":[{"role":"user","content":"` + m + `"}]}`
		}},
		{"responses by header", "/codex/v1/responses", []string{"session_id", "alice"}, func(m string) string {
			return `{"model":"gpt-5.5","input":"` + m + `"}`
		}},
		{"messages on responses by x-session-id", "/codex/responses", []string{"X-Session-Id", "alice"}, func(m string) string {
			return `{"model":"gpt-5.5","messages":[{"role":"user","content":"` + m + `"}]}`
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n := 0
			fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
				n++
				writeEvents(w, textReply(fmt.Sprintf("resp_%d", n), fmt.Sprintf("answer %d", n)))
			})
			p := newProxy(t, fb)
			for _, msg := range []string{"My name is Alice", "What is my name?"} {
				if resp, body := p.post(t, tc.path, tc.body(msg), tc.header...); resp.StatusCode != 200 {
					t.Fatalf("status %d: %s", resp.StatusCode, body)
				}
			}
			input, _ := json.Marshal(fb.bodies[1]["input"])
			for _, want := range []string{"My name is Alice", "answer 1", "What is my name?"} {
				if !bytes.Contains(input, []byte(want)) {
					t.Errorf("second upstream input %s lacks %q", input, want)
				}
			}
			if fb.bodies[1]["prompt_cache_key"] != "alice" {
				t.Errorf("prompt_cache_key = %v; want alice", fb.bodies[1]["prompt_cache_key"])
			}
			_, body := p.get(t, "/codex/sessions/alice")
			if got := decode(t, body); got["id"] != "alice" || len(jsonPath(got, "transcript").([]any)) != 4 {
				t.Errorf("GET /codex/sessions/alice = %s; want 4 items", body)
			}
		})
	}
}

// get sends a GET and returns the response and body.
func (p *proxy) get(t *testing.T, path string) (*http.Response, string) {
	t.Helper()
	resp, err := http.Get(p.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b)
}

func TestResponsesAPI(t *testing.T) {
	n := 0
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		n++
		writeEvents(w, textReply(fmt.Sprintf("resp_%d", n), "Hi ", "there"))
	})
	p := newProxy(t, fb)

	resp, body := p.post(t, "/codex/v1/responses", `{"model":"gpt-5.5","input":"hello","instructions":"be nice","temperature":1}`)
	got := decode(t, body)
	if resp.StatusCode != 200 || got["output_text"] != "Hi there" || got["id"] != "resp_1" {
		t.Fatalf("non-stream response %d %s; want output_text Hi there", resp.StatusCode, body)
	}
	if resp.Header.Get("X-Ccproxy-Ignored-Params") != "temperature" {
		t.Errorf("ignored params %q; want temperature", resp.Header.Get("X-Ccproxy-Ignored-Params"))
	}
	if in := fb.bodies[0]["input"].([]any); jsonPath(in, 0, "role") != "developer" || fb.bodies[0]["instructions"] != nil {
		t.Errorf("auto mode upstream input %v; want the instructions as a leading developer message and no instructions field", in)
	}

	// previous_response_id continues the conversation although the backend
	// rejects the field.
	resp, body = p.post(t, "/codex/v1/responses", `{"model":"gpt-5.5","input":"again","previous_response_id":"resp_1","stream":true}`)
	if resp.StatusCode != 200 || !strings.Contains(body, "event: response.output_text.delta") || !strings.Contains(body, "event: response.completed") {
		t.Fatalf("stream %d:\n%s", resp.StatusCode, body)
	}
	input, _ := json.Marshal(fb.bodies[1]["input"])
	if !bytes.Contains(input, []byte("hello")) || !bytes.Contains(input, []byte("Hi there")) || !bytes.Contains(input, []byte("again")) {
		t.Errorf("expanded input %s; want the first exchange and the new input", input)
	}
}

// TestCodexCLIRequestShape sends what Codex CLI 0.169.0 sends and checks it arrives intact, ids aside.
func TestCodexCLIRequestShape(t *testing.T) {
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		writeEvents(w, textReply("resp_1", "done"))
	})
	p := newProxy(t, fb)
	req := `{"model":"gpt-5.5","stream":true,"store":false,
	 "input":[{"type":"message","id":"msg_0a1","role":"developer","content":[{"type":"input_text","text":"You are Codex."}]},
	          {"type":"message","id":"msg_0a2","role":"user","content":[{"type":"input_text","text":"list files"}]}],
	 "tools":[{"type":"function","name":"shell","description":"run","strict":false,"parameters":{"type":"object","properties":{}}},
	          {"type":"custom","name":"apply_patch","description":"patch","format":{"type":"grammar","syntax":"lark","definition":"start: x"}},
	          {"type":"web_search"}],
	 "tool_choice":"auto","parallel_tool_calls":true,"reasoning":{"summary":"auto"},
	 "include":["reasoning.encrypted_content"],"prompt_cache_key":"0199-cli-session","client_metadata":{"x-codex-installation-id":"abc"}}`
	resp, body := p.post(t, "/codex/responses", req, "session-id", "0199-cli-session", "x-codex-turn-state", "ts-1", "thread-id", "0199-cli-session")
	if resp.StatusCode != 200 || !strings.Contains(body, "response.completed") {
		t.Fatalf("status %d:\n%s", resp.StatusCode, body)
	}
	up := fb.bodies[0]
	tools, _ := json.Marshal(up["tools"])
	if !bytes.Contains(tools, []byte(`"definition":"start: x"`)) || !bytes.Contains(tools, []byte(`"type":"web_search"`)) {
		t.Errorf("tools changed: %s", tools)
	}
	if up["prompt_cache_key"] != "0199-cli-session" || jsonPath(up, "client_metadata", "x-codex-installation-id") != "abc" ||
		up["parallel_tool_calls"] != true || jsonPath(up, "input", 1, "content", 0, "text") != "list files" {
		t.Errorf("upstream body %v; want the CLI's fields intact", up)
	}
	if _, ok := up["instructions"]; ok {
		t.Error("instructions added to a request that had none")
	}
	if h := fb.heads[0]; h.Get("X-Codex-Turn-State") != "ts-1" || h.Get("Thread-Id") != "0199-cli-session" || h.Get("Authorization") != "Bearer "+testAccessToken {
		t.Errorf("upstream headers %v; want the CLI's turn headers and the proxy's bearer", h)
	}
}

func TestModelsAndUsage(t *testing.T) {
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		writeEvents(w, textReply("resp_1", "ok"))
	})
	p := newProxy(t, fb)
	_, body := p.get(t, "/codex/usage")
	if body != `{"available":false}` {
		t.Errorf("usage before any reply = %s; want available false", body)
	}
	for _, path := range []string{"/codex/models", "/codex/v1/models"} {
		_, body := p.get(t, path)
		got := decode(t, body)
		data, _ := got["data"].([]any)
		if got["object"] != "list" || len(data) != len(backendModels) || jsonPath(data, 0, "id") != "gpt-5.5" {
			t.Errorf("%s = %s; want the visible catalog models", path, body)
		}
	}
	if _, err := os.Stat(filepath.Join(p.cfg.home, "models.json")); err != nil {
		t.Errorf("catalog not cached on disk: %v", err)
	}
	p.post(t, "/codex/v1/chat/completions", `{"model":"gpt-5.5","messages":[{"role":"user","content":"hi"}]}`)
	_, body = p.get(t, "/codex/usage")
	if got := decode(t, body); got["plan"] != "plus" || jsonPath(got, "primary", "used_percent") != 12.0 {
		t.Errorf("usage = %s; want plan plus and primary 12%%", body)
	}
}

// TestInstructionsFallback: by default no instructions are sent. A backend that says they are
// required gets "" once more and from then on; one that says they are not valid gets the
// catalog's prompt for the model.
func TestInstructionsFallback(t *testing.T) {
	tests := []struct {
		name   string
		refuse func(instructions any) string // the backend's 400 detail, or ""
		want   []any                         // the instructions member of each upstream request
	}{
		{"required", func(in any) string {
			if in == nil {
				return "Instructions are required"
			}
			return ""
		}, []any{nil, "", ""}},
		{"not valid", func(in any) string {
			if in == nil || in == "" {
				return "Instructions are not valid"
			}
			return ""
		}, []any{nil, "You are Codex, gpt-5.5", "You are Codex, gpt-5.5"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
				if msg := tc.refuse(body["instructions"]); msg != "" {
					w.WriteHeader(400)
					fmt.Fprintf(w, `{"detail":%q}`, msg)
					return
				}
				writeEvents(w, textReply("resp_1", "ok"))
			})
			p := newProxy(t, fb)
			for i := 0; i < 2; i++ {
				if resp, body := p.post(t, "/codex/v1/chat/completions", `{"model":"gpt-5.5","messages":[{"role":"user","content":"hi"}]}`); resp.StatusCode != 200 {
					t.Fatalf("turn %d: %d %s", i, resp.StatusCode, body)
				}
			}
			var got []any
			for _, b := range fb.bodies {
				got = append(got, b["instructions"])
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("upstream instructions %q; want %q", got, tc.want)
			}
		})
	}
}

// loadReply streams 200 one-token deltas, flushing each, one every pace (all
// at once when pace is 0), and waits for hold (when not nil) after the first.
func loadReply(hold <-chan struct{}, pace time.Duration) func(w http.ResponseWriter, r *http.Request, body map[string]any) {
	parts := make([]string, 200)
	for i := range parts {
		parts[i] = "tok "
	}
	events := textReply("resp_load", parts...)
	return func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		writeEvents(w, events[:3])
		if hold != nil {
			select {
			case <-hold:
			case <-r.Context().Done():
				return
			}
		}
		if pace == 0 {
			writeEvents(w, events[3:])
			return
		}
		tick := time.NewTicker(pace)
		defer tick.Stop()
		for _, e := range events[3:] {
			select {
			case <-tick.C:
			case <-r.Context().Done():
				return
			}
			writeEvents(w, []string{e})
		}
	}
}

// loadClient opens n streams at once (direct to the fake backend, or
// through the proxy) and returns each stream's time to its first delta,
// the deltas received and the failures. onFirst runs once every stream has
// its first delta.

// newLoadClient is a client that keeps n connections open, as a real
// client of a local proxy keeps its keep-alive connections.
func newLoadClient(n int) *http.Client {
	return &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: n, DisableCompression: true}}
}
func loadClient(tb testing.TB, client *http.Client, n int, direct bool, fb *fakeBackend, p *proxy, onFirst func()) (ttfb []time.Duration, deltas, failures int) {
	var mu sync.Mutex
	var first, all sync.WaitGroup
	first.Add(n)
	all.Add(n)
	start := make(chan struct{})
	for i := 0; i < n; i++ {
		go func() {
			defer all.Done()
			firstDone := false
			defer func() {
				if !firstDone {
					first.Done()
				}
			}()
			var req *http.Request
			if direct {
				req, _ = http.NewRequest("POST", fb.URL+"/responses", strings.NewReader(`{"model":"gpt-5.5","stream":true,"store":false,"input":[{"type":"message","role":"user","content":[{"type":"input_text","text":"go"}]}]}`))
				req.Header.Set("Authorization", "Bearer "+testAccessToken)
				req.Header.Set("Chatgpt-Account-Id", testAccountID)
			} else {
				req, _ = http.NewRequest("POST", p.URL+"/codex/v1/chat/completions", strings.NewReader(`{"model":"gpt-5.5","stream":true,"messages":[{"role":"user","content":"go"}]}`))
			}
			<-start
			t0 := time.Now()
			resp, err := client.Do(req)
			if err != nil || resp.StatusCode != 200 {
				mu.Lock()
				failures++
				mu.Unlock()
				return
			}
			defer resp.Body.Close()
			rd := newSSEReader(resp.Body)
			deltaMark := []byte(`"content":"tok `)
			if direct {
				deltaMark = []byte(`"type":"response.output_text.delta"`)
			}
			got := 0
			for {
				_, data, err := rd.next()
				if err != nil {
					break
				}
				if bytes.Contains(data, deltaMark) {
					got++
					if got == 1 {
						mu.Lock()
						ttfb = append(ttfb, time.Since(t0))
						mu.Unlock()
						firstDone = true
						first.Done()
					}
				}
			}
			mu.Lock()
			deltas += got
			if got != 200 {
				failures++
			}
			mu.Unlock()
		}()
	}
	close(start)
	first.Wait()
	if onFirst != nil {
		onFirst()
	}
	all.Wait()
	return ttfb, deltas, failures
}

// percentile returns the p-th percentile (0–100) of ds.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p/100))]
}

// BenchmarkLoad runs N concurrent streaming clients, each receiving 200
// deltas, straight to an in-process fake backend and then through the proxy,
// and reports the proxy's own share: added time to first delta (p50, p99)
// and the delta throughput. "paced" streams a delta every 10 ms per stream
// (a fast model); "burst" sends all 200 at once, which measures throughput
// when the two cores are saturated.
//
//	go test -run '^$' -bench Load -benchtime 3x
func BenchmarkLoad(b *testing.B) {
	for _, bc := range []struct {
		name string
		n    int
		pace time.Duration
	}{{"paced/streams=10", 10, 10 * time.Millisecond}, {"paced/streams=100", 100, 10 * time.Millisecond}, {"paced/streams=1000", 1000, 10 * time.Millisecond},
		{"burst/streams=1", 1, 0}, {"burst/streams=100", 100, 0}} {
		b.Run(bc.name, func(b *testing.B) {
			fb := newFakeBackend(b, loadReply(nil, bc.pace))
			p := newProxy(b, fb, func(c *config) { c.logLevel = slog.LevelInfo }) // the default
			p.up.client = newUpstreamClient()                                     // the production client, 64 idle connections
			dc, pc := newLoadClient(bc.n), newLoadClient(bc.n)
			defer dc.CloseIdleConnections()
			defer pc.CloseIdleConnections()
			loadClient(b, dc, bc.n, true, fb, p, nil) // warm up: connections open, as in steady use
			loadClient(b, pc, bc.n, false, fb, p, nil)
			var direct, proxied []time.Duration
			var deltas, directDeltas, failures int
			var elapsed time.Duration
			var directCPU, proxiedCPU float64
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				c0 := cpuSeconds()
				d, dgot, f := loadClient(b, dc, bc.n, true, fb, p, nil)
				c1 := cpuSeconds()
				direct = append(direct, d...)
				t0 := time.Now()
				pr, got, f2 := loadClient(b, pc, bc.n, false, fb, p, nil)
				elapsed += time.Since(t0)
				c2 := cpuSeconds()
				directCPU += c1 - c0
				proxiedCPU += c2 - c1
				proxied = append(proxied, pr...)
				deltas += got
				directDeltas += dgot
				failures += f + f2
			}
			if failures > 0 {
				b.Errorf("%d streams failed", failures)
			}
			us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
			b.ReportMetric(us(percentile(direct, 50)), "direct-ttfb-p50-µs")
			b.ReportMetric(us(percentile(proxied, 50)-percentile(direct, 50)), "added-ttfb-p50-µs")
			b.ReportMetric(us(percentile(proxied, 99)-percentile(direct, 99)), "added-ttfb-p99-µs")
			b.ReportMetric(float64(deltas)/elapsed.Seconds(), "deltas/s")
			// The fake backend and the clients run in this process too: the proxied run's CPU
			// less the direct run's is the proxy's share.
			b.ReportMetric(directCPU/float64(directDeltas)*1e6, "direct-cpu-µs/delta")
			b.ReportMetric((proxiedCPU-directCPU)/float64(deltas)*1e6, "proxy-cpu-µs/delta")
			b.ReportMetric(0, "ns/op")
		})
	}
}

// cpuSeconds is the CPU time the process has used so far, as the Go runtime counts it: the
// time its Ps were not idle. The runtime updates these counters only at a garbage collection,
// so it forces one first.
func cpuSeconds() float64 {
	runtime.GC()
	s := []metrics.Sample{{Name: "/cpu/classes/total:cpu-seconds"}, {Name: "/cpu/classes/idle:cpu-seconds"}}
	metrics.Read(s)
	return s[0].Value.Float64() - s[1].Value.Float64()
}

// BenchmarkHeapPerStream holds N streams open (each has its first delta)
// and reports the heap the proxy adds per open stream, beside the same
// streams sent straight to the fake backend.
//
//	go test -run '^$' -bench HeapPerStream -benchtime 1x
func BenchmarkHeapPerStream(b *testing.B) {
	const n = 1000
	heapWhileOpen := func(direct bool) float64 {
		hold := make(chan struct{})
		fb := newFakeBackend(b, loadReply(hold, 0))
		p := newProxy(b, fb, func(c *config) { c.logLevel = slog.LevelInfo })
		var ms runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&ms)
		before := ms.HeapAlloc
		var open uint64
		client := newLoadClient(n)
		defer client.CloseIdleConnections()
		_, _, failures := loadClient(b, client, n, direct, fb, p, func() {
			runtime.GC()
			runtime.ReadMemStats(&ms)
			open = ms.HeapAlloc
			close(hold)
		})
		if failures > 0 {
			b.Errorf("%d streams failed", failures)
		}
		return float64(open-before) / n
	}
	var direct, added float64
	for i := 0; i < b.N; i++ {
		d := heapWhileOpen(true)
		direct += d
		added += heapWhileOpen(false) - d
	}
	b.ReportMetric(direct/float64(b.N), "direct-B/stream")
	b.ReportMetric(added/float64(b.N), "added-B/stream")
	b.ReportMetric(0, "ns/op")
}

// TestTokenRefreshFaults drives the upstream 401 path through the real
// credential file and a fake token endpoint.
func TestTokenRefreshFaults(t *testing.T) {
	fresh := testJWT(map[string]any{"exp": time.Now().Add(time.Hour).Unix(),
		"https://api.openai.com/auth": map[string]any{"chatgpt_account_id": testAccountID}})
	tests := []struct {
		name          string
		backendToken  string // what the backend accepts after the first 401
		tokenEndpoint int    // status of the fake token endpoint; 0 = down
		wantStatus    int
		want          string
		wantCalls     int
	}{
		{"refresh then retry", fresh, 200, 200, `"content":"ok"`, 2},
		{"401 twice", "never", 200, 401, "ccproxy auth login-openai", 2},
		{"refresh token reused", fresh, 401, 401, "already been used", 1},
		{"token endpoint down", fresh, 0, 502, "could not refresh the ChatGPT token", 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var refreshes int
			oauth := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				refreshes++
				if tc.tokenEndpoint == 401 {
					w.WriteHeader(401)
					io.WriteString(w, `{"error":{"message":"Your refresh token has already been used to generate a new access token. Please try signing in again.","type":"invalid_request_error","param":null,"code":"refresh_token_reused"}}`)
					return
				}
				json.NewEncoder(w).Encode(map[string]string{"access_token": fresh, "refresh_token": "rt_rotated"})
			}))
			defer oauth.Close()
			authURL := oauth.URL
			if tc.tokenEndpoint == 0 {
				oauth.Close()
			}
			calls := 0
			fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
				writeEvents(w, textReply("resp_1", "ok"))
			})
			fb.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				calls++
				fb.serve(w, r)
				fb.mu.Lock()
				fb.token = tc.backendToken // the first token is now revoked
				fb.mu.Unlock()
			})
			fb.token = "revoked"
			p := newProxy(t, fb, func(c *config) { c.authURL = authURL })
			resp, body := p.post(t, "/codex/v1/chat/completions", `{"model":"gpt-5.5","messages":[{"role":"user","content":"hi"}]}`)
			if resp.StatusCode != tc.wantStatus || !strings.Contains(body, tc.want) {
				t.Errorf("%d %s; want %d with %q", resp.StatusCode, body, tc.wantStatus, tc.want)
			}
			if calls != tc.wantCalls {
				t.Errorf("backend called %d times; want %d", calls, tc.wantCalls)
			}
			if tc.tokenEndpoint != 0 && refreshes != 1 {
				t.Errorf("token endpoint called %d times; want 1", refreshes)
			}
			file, _ := os.ReadFile(p.cfg.authPath)
			refreshed := tc.tokenEndpoint == 200
			if refreshed && !bytes.Contains(file, []byte("rt_rotated")) {
				t.Errorf("rotated refresh token not saved:\n%s", file)
			}
			if !refreshed && !bytes.Contains(file, []byte("rt_test")) {
				t.Errorf("credential file changed after a failed refresh:\n%s", file)
			}
		})
	}
}

// settleGoroutines waits until the goroutine count is back to base, and
// fails the test if it never gets there: something leaked.
func settleGoroutines(t *testing.T, base int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines still running; want %d:\n%s", runtime.NumGoroutine(), base, buf[:runtime.Stack(buf, true)])
		}
		runtime.Gosched()
	}
}

// TestStalledUpstream: the backend sends headers and then nothing. The client
// gets keepalives, leaves, and every goroutine of the exchange ends.
func TestStalledUpstream(t *testing.T) {
	base := runtime.NumGoroutine()
	func() {
		backendGone := make(chan struct{})
		fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
			w.Header().Set("Content-Type", "text/event-stream")
			w.WriteHeader(200)
			http.NewResponseController(w).Flush()
			<-r.Context().Done()
			close(backendGone)
		})
		p := newProxy(t, fb, func(c *config) { c.keepalive = 5 * time.Millisecond })
		client := &http.Client{Transport: &http.Transport{}}
		ctx, cancel := context.WithCancel(context.Background())
		req, _ := http.NewRequestWithContext(ctx, "POST", p.URL+"/codex/v1/responses", strings.NewReader(`{"model":"gpt-5.5","stream":true,"input":"hi"}`))
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(resp.Body)
		for n := 0; n < 2; {
			line, err := br.ReadString('\n')
			if err != nil {
				t.Fatalf("stream ended: %v", err)
			}
			if line == ": keepalive\n" {
				n++
			}
		}
		cancel()
		resp.Body.Close()
		<-backendGone
		client.CloseIdleConnections()
		fb.Client().CloseIdleConnections()
		p.Close()
		fb.Close()
	}()
	settleGoroutines(t, base)
}

// TestClientLeavesAtEveryStage: a client that goes away stops the work for
// it at once, whatever the proxy was doing, and leaves no goroutine behind
// and no half-written session.
func TestClientLeavesAtEveryStage(t *testing.T) {
	tests := []struct {
		name  string
		reply func(reached chan<- struct{}) func(w http.ResponseWriter, r *http.Request, body map[string]any)
		ready func(resp *http.Response) // runs once the stage is reached, before the client leaves
	}{
		{"waiting for the backend's headers", func(reached chan<- struct{}) func(w http.ResponseWriter, r *http.Request, body map[string]any) {
			return func(w http.ResponseWriter, r *http.Request, body map[string]any) {
				close(reached)
				<-r.Context().Done()
			}
		}, nil},
		{"in the retry backoff", func(reached chan<- struct{}) func(w http.ResponseWriter, r *http.Request, body map[string]any) {
			var once sync.Once
			return func(w http.ResponseWriter, r *http.Request, body map[string]any) {
				w.WriteHeader(503)
				once.Do(func() { close(reached) })
			}
		}, nil},
		{"mid-stream", func(reached chan<- struct{}) func(w http.ResponseWriter, r *http.Request, body map[string]any) {
			return func(w http.ResponseWriter, r *http.Request, body map[string]any) {
				writeEvents(w, textReply("resp_1", "Hel")[:3])
				close(reached)
				<-r.Context().Done()
			}
		}, nil},
		{"reading a non-stream answer", func(reached chan<- struct{}) func(w http.ResponseWriter, r *http.Request, body map[string]any) {
			return func(w http.ResponseWriter, r *http.Request, body map[string]any) {
				writeEvents(w, textReply("resp_1", "Hel")[:3])
				close(reached)
				<-r.Context().Done()
			}
		}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			base := runtime.NumGoroutine()
			func() {
				reached := make(chan struct{})
				fb := newFakeBackend(t, tc.reply(reached))
				p := newProxy(t, fb)
				p.up.backoff = time.Hour // a retry wait only the client's leaving can end
				client := &http.Client{Transport: &http.Transport{}}
				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan error, 1)
				go func() {
					stream := !strings.HasPrefix(tc.name, "reading a non-stream")
					req, _ := http.NewRequestWithContext(ctx, "POST", p.URL+"/codex/s1/responses",
						strings.NewReader(fmt.Sprintf(`{"model":"gpt-5.5","stream":%v,"input":"hi"}`, stream)))
					resp, err := client.Do(req)
					if err == nil {
						_, err = io.ReadAll(resp.Body)
						resp.Body.Close()
					}
					done <- err
				}()
				<-reached
				cancel()
				if err := <-done; err == nil {
					t.Error("the request completed; want it canceled")
				}
				client.CloseIdleConnections()
				fb.Client().CloseIdleConnections()
				p.Close() // waits for the handler to return
				fb.Close()
				// The turn never committed: the new session does not exist.
				if _, _, err := p.sessions.get("s1"); err == nil || show(err).status != 404 {
					t.Errorf("session after a canceled turn: %v; want 404", err)
				}
				// The client's leaving is its doing: no error, no 502, no "stream broke".
				if log := p.log.String(); strings.Contains(log, "level=ERROR") || strings.Contains(log, "status=502") ||
					!strings.Contains(log, "client_gone=true") {
					t.Errorf("log of a client that left:\n%s\nwant client_gone=true and no error or 502", log)
				}
			}()
			settleGoroutines(t, base)
		})
	}
}

// TestSessionDiskFailure: when the sessions directory cannot be written, the
// client hears of it, and the session keeps its earlier turns on disk and in
// memory.
func TestSessionDiskFailure(t *testing.T) {
	for _, stream := range []bool{false, true} {
		t.Run(fmt.Sprintf("stream=%v", stream), func(t *testing.T) {
			fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
				writeEvents(w, textReply("resp_x", "ok"))
			})
			p := newProxy(t, fb)
			body := fmt.Sprintf(`{"model":"gpt-5.5","stream":%v,"input":"hi"}`, stream)
			if resp, b := p.post(t, "/codex/disk/responses", body); resp.StatusCode != 200 {
				t.Fatalf("first turn: %d %s", resp.StatusCode, b)
			}
			dir := filepath.Join(p.cfg.home, "sessions")
			before, err := os.ReadFile(filepath.Join(dir, "disk.json"))
			if err != nil {
				t.Fatal(err)
			}
			// Root ignores permissions, so break the directory itself.
			os.Rename(dir, dir+".bak")
			os.WriteFile(dir, nil, 0o600)
			resp, b := p.post(t, "/codex/disk/responses", body)
			os.Remove(dir)
			os.Rename(dir+".bak", dir)
			if !strings.Contains(b, "session_not_saved") || !strings.Contains(b, "still holds the previous turns") {
				t.Errorf("turn on a broken disk: %d %s; want a session_not_saved error", resp.StatusCode, b)
			}
			if stream && strings.Contains(b, "event: response.completed") {
				t.Errorf("a turn that was not saved ended with response.completed:\n%s", b)
			}
			after, _ := os.ReadFile(filepath.Join(dir, "disk.json"))
			if !bytes.Equal(before, after) {
				t.Errorf("session file changed:\n%s\nwant\n%s", after, before)
			}
			if _, b := p.get(t, "/codex/sessions/disk"); len(jsonPath(decode(t, b), "transcript").([]any)) != 2 {
				t.Errorf("in-memory transcript after the failed save: %s; want the first turn's 2 items", b)
			}
		})
	}
}

// TestCompletedOnlyIsSaved: a backend that sends the reply only inside response.completed (no
// output_item.done) gets it saved in the session, as the client got it.
func TestCompletedOnlyIsSaved(t *testing.T) {
	msg := map[string]any{"id": "msg_1", "type": "message", "role": "assistant",
		"content": []any{map[string]any{"type": "output_text", "text": "only in completed"}}}
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		writeEvents(w, []string{
			sse("response.created", map[string]any{"response": map[string]any{"id": "resp_c", "output": []any{}}}),
			sse("response.completed", map[string]any{"response": map[string]any{"id": "resp_c", "status": "completed",
				"output": []any{msg}}}),
		})
	})
	p := newProxy(t, fb)
	for _, tc := range []struct{ path, body string }{
		{"/codex/c1/chat/completions", `{"model":"gpt-5.5","messages":[{"role":"user","content":"hi"}]}`},
		{"/codex/c2/responses", `{"model":"gpt-5.5","input":"hi","stream":true}`},
	} {
		if resp, body := p.post(t, tc.path, tc.body); resp.StatusCode != 200 || !strings.Contains(body, "only in completed") {
			t.Fatalf("%s: %d %s; want the answer", tc.path, resp.StatusCode, body)
		}
		id := strings.Split(tc.path, "/")[2]
		_, body := p.get(t, "/codex/sessions/"+id)
		if tr := jsonPath(decode(t, body), "transcript"); !strings.Contains(fmt.Sprint(tr), "only in completed") {
			t.Errorf("session %s transcript %v; want the reply saved", id, tr)
		}
	}
}

// TestWrappedErrorKeepsItsHint: when the backend insists on instructions and the catalog has
// none, the client hears both failures and what to do.
func TestWrappedErrorKeepsItsHint(t *testing.T) {
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		w.WriteHeader(400)
		io.WriteString(w, `{"detail":"Instructions are not valid"}`)
	})
	fb.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/models" { // a catalog without base instructions
			io.WriteString(w, `{"models":[{"slug":"gpt-5.5"}]}`)
			return
		}
		fb.serve(w, r)
	})
	p := newProxy(t, fb)
	resp, body := p.post(t, "/codex/v1/chat/completions", `{"model":"gpt-5.5","messages":[{"role":"user","content":"hi"}]}`)
	if resp.StatusCode != 400 || !strings.Contains(body, "Instructions are not valid") ||
		!strings.Contains(body, "use --instructions file:PATH") {
		t.Errorf("%d %s; want 400 with the backend's message and the hint", resp.StatusCode, body)
	}
	if !strings.Contains(p.log.String(), "use --instructions file:PATH") {
		t.Errorf("log lacks the hint:\n%s", p.log.String())
	}
}

// codexCLIRequest loads a request the Codex CLI 0.169.0 sent (testdata/codex-cli): its headers
// and its body.
func codexCLIRequest(t *testing.T, model string) (map[string]string, map[string]any, []byte) {
	t.Helper()
	b, err := os.ReadFile("testdata/codex-cli/request-" + model + ".json")
	if err != nil {
		t.Fatal(err)
	}
	var capture struct {
		Headers map[string]string `json:"headers"`
		Body    json.RawMessage   `json:"body"`
	}
	if err := json.Unmarshal(b, &capture); err != nil {
		t.Fatal(err)
	}
	var body map[string]any
	json.Unmarshal(capture.Body, &body)
	return capture.Headers, body, capture.Body
}

// TestCodexCLIPassThrough sends what the Codex CLI 0.169.0 sent for a Lite model (gpt-6-sol) and
// for the classic gpt-5.5, and checks that each reaches the backend in its own shape, intact
// but for the item ids, the Lite header included.
func TestCodexCLIPassThrough(t *testing.T) {
	for _, model := range []string{"gpt-6-sol", "gpt-5.5"} {
		t.Run(model, func(t *testing.T) {
			fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
				writeEvents(w, textReply("resp_1", "hello"))
			})
			p := newProxy(t, fb)
			headers, sent, raw := codexCLIRequest(t, model)
			var hs []string
			for k, v := range headers {
				if k != "authorization" {
					hs = append(hs, k, v)
				}
			}
			resp, body := p.post(t, "/codex/responses", string(raw), hs...)
			if resp.StatusCode != 200 || !strings.Contains(body, "event: response.completed") {
				t.Fatalf("status %d:\n%.400s", resp.StatusCode, body)
			}
			up, h := fb.bodies[0], fb.heads[0]
			lite := model == "gpt-6-sol"
			if got := h.Get("X-Openai-Internal-Codex-Responses-Lite") == "true"; got != lite {
				t.Errorf("Lite header sent = %v; want %v", got, lite)
			}
			in, _ := up["input"].([]any)
			want, _ := sent["input"].([]any)
			for i := range want {
				delete(want[i].(map[string]any), "id")
			}
			if len(in) != len(want) || jsonString(in) != jsonString(want) {
				t.Errorf("input differs:\n got %.600s\nwant %.600s", jsonString(in), jsonString(want))
			}
			for _, k := range []string{"tools", "tool_choice", "parallel_tool_calls", "reasoning", "text",
				"prompt_cache_key", "client_metadata", "include"} {
				if jsonString(up[k]) != jsonString(sent[k]) {
					t.Errorf("%s = %s; want %s", k, jsonString(up[k]), jsonString(sent[k]))
				}
			}
			if _, ok := up["instructions"]; ok {
				t.Error("instructions added to a request that had none")
			}
		})
	}
}

// jsonString encodes v for comparisons.
func jsonString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// callReply is a turn that calls get_weather: the item arrives with deltas, then whole.
func callReply(respID string) []string {
	call := map[string]any{"id": "fc_1", "type": "function_call", "call_id": "call_w", "name": "get_weather", "arguments": `{"city":"Paris"}`}
	added := map[string]any{"id": "fc_1", "type": "function_call", "call_id": "call_w", "name": "get_weather", "arguments": ""}
	return []string{
		sse("response.created", map[string]any{"response": map[string]any{"id": respID, "output": []any{}}}),
		sse("response.output_item.added", map[string]any{"output_index": 0, "item": added}),
		sse("response.function_call_arguments.delta", map[string]any{"item_id": "fc_1", "output_index": 0, "delta": `{"city":`}),
		sse("response.function_call_arguments.delta", map[string]any{"item_id": "fc_1", "output_index": 0, "delta": `"Paris"}`}),
		sse("response.output_item.done", map[string]any{"output_index": 0, "item": call}),
		sse("response.completed", map[string]any{"response": map[string]any{"id": respID, "status": "completed", "output": []any{call}}}),
	}
}

// TestToolCallsOnLiteAndClassic runs a chat tool round trip, streamed and not, in a session,
// on a Lite model and on gpt-5.5: the backend (which enforces each shape) sees the tools where
// the model wants them, and the conversation goes on.
func TestToolCallsOnLiteAndClassic(t *testing.T) {
	tools := `"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}]`
	for _, model := range []string{"gpt-6-sol", "gpt-5.5"} {
		for _, stream := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s stream=%v", model, stream), func(t *testing.T) {
				n := 0
				fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
					if n++; n == 1 {
						writeEvents(w, callReply("resp_1"))
					} else {
						writeEvents(w, textReply("resp_2", "18C in Paris"))
					}
				})
				p := newProxy(t, fb)
				first := fmt.Sprintf(`{"model":%q,"stream":%v,%s,"messages":[{"role":"user","content":"Weather in Paris?"}]}`, model, stream, tools)
				resp, body := p.post(t, "/codex/w/chat/completions", first)
				if resp.StatusCode != 200 || !strings.Contains(body, `"call_w"`) || !strings.Contains(body, `\"Paris\"`) {
					t.Fatalf("first turn %d:\n%s", resp.StatusCode, body)
				}
				second := fmt.Sprintf(`{"model":%q,"stream":%v,%s,"messages":[{"role":"user","content":"Weather in Paris?"},
					{"role":"assistant","tool_calls":[{"id":"call_w","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
					{"role":"tool","tool_call_id":"call_w","content":"18C"}]}`, model, stream, tools)
				if resp, body := p.post(t, "/codex/w/chat/completions", second); resp.StatusCode != 200 || !strings.Contains(body, "18C in Paris") {
					t.Fatalf("second turn %d:\n%s", resp.StatusCode, body)
				}
				if in := jsonString(fb.bodies[1]["input"]); strings.Count(in, `"call_w"`) != 2 {
					t.Errorf("second upstream input %s; want the call and its output once each", in)
				}
			})
		}
	}
}

// TestCapabilities: what a model cannot take is refused before any upstream call, naming the
// parameter and the values it can take; what it does not accept is not sent.
func TestCapabilities(t *testing.T) {
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		writeEvents(w, textReply("resp_1", "ok"))
	})
	p := newProxy(t, fb)
	image := `{"role":"user","content":[{"type":"text","text":"what is this?"},{"type":"image_url","image_url":"data:image/png;base64,iVBORw0KGgo="}]}`
	tests := []struct {
		name, path, body string
		status           int
		want             []string
	}{
		{"image to a text-only model", "/codex/v1/chat/completions", `{"model":"gpt-5.3-codex-spark","messages":[` + image + `]}`,
			400, []string{`"param":"messages"`, "does not accept image input", "'text'"}},
		{"effort the model lacks", "/codex/v1/chat/completions", `{"model":"gpt-6-sol","reasoning_effort":"minimal","messages":[{"role":"user","content":"hi"}]}`,
			400, []string{`"param":"reasoning_effort"`, "'low', 'medium', 'high', 'xhigh', 'max' and 'ultra'"}},
		{"effort suffix the model lacks", "/codex/v1/responses", `{"model":"gpt-5.5:ultra","input":"hi"}`,
			400, []string{`"param":"reasoning.effort"`, "'xhigh'"}},
		{"tier the model lacks", "/codex/v1/responses", `{"model":"gpt-daybreak-blue-latest","service_tier":"fast","input":"hi"}`,
			400, []string{`"param":"service_tier"`, "'default'"}},
		{"summary to a model that refuses it", "/codex/v1/chat/completions", `{"model":"gpt-5.3-codex-spark","messages":[{"role":"user","content":"hi"}]}`,
			200, []string{`"content":"ok"`}},
		{"image to a model that reads images", "/codex/v1/chat/completions", `{"model":"gpt-6-sol","messages":[` + image + `]}`,
			200, []string{`"content":"ok"`}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			calls := len(fb.bodies)
			resp, body := p.post(t, tc.path, tc.body)
			if resp.StatusCode != tc.status {
				t.Fatalf("%d %s; want %d", resp.StatusCode, body, tc.status)
			}
			for _, w := range tc.want {
				if !strings.Contains(body, w) {
					t.Errorf("body %s; want %q", body, w)
				}
			}
			if tc.status == 400 && len(fb.bodies) != calls {
				t.Errorf("the backend was called for a request refused before it")
			}
		})
	}
}

// TestTiersAndRefusedKeys: service tiers and -fast ids become priority, other tiers and the
// prompt-caching keys inside content parts are dropped and named.
func TestTiersAndRefusedKeys(t *testing.T) {
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		writeEvents(w, textReply("resp_1", "ok"))
	})
	p := newProxy(t, fb)
	tests := []struct {
		name, path, body string
		model, tier      string
		ignored          string
	}{
		{"fast", "/codex/v1/chat/completions", `{"model":"gpt-5.5","service_tier":"fast","messages":[{"role":"user","content":"hi"}]}`, "gpt-5.5", "priority", ""},
		{"-fast model id", "/codex/v1/responses", `{"model":"gpt-6-sol-fast","input":"hi"}`, "gpt-6-sol", "priority", ""},
		{"-fast with an effort", "/codex/v1/responses", `{"model":"gpt-6-sol-fast:high","input":"hi"}`, "gpt-6-sol", "priority", ""},
		{"default", "/codex/v1/responses", `{"model":"gpt-5.5","service_tier":"default","input":"hi"}`, "gpt-5.5", "default", ""},
		{"flex", "/codex/v1/responses", `{"model":"gpt-5.5","service_tier":"flex","input":"hi"}`, "gpt-5.5", "", "service_tier"},
		{"chat cache_control", "/codex/v1/chat/completions", `{"model":"gpt-5.5","messages":[{"role":"user","content":[{"type":"text","text":"hi","cache_control":{"type":"ephemeral"}}]}]}`,
			"gpt-5.5", "", "messages[0].content[0].cache_control"},
		{"responses breakpoint", "/codex/v1/responses", `{"model":"gpt-5.5","prompt_cache_retention":"24h","input":[{"role":"user","content":[{"type":"input_text","text":"hi","prompt_cache_breakpoint":true}]}]}`,
			"gpt-5.5", "", "input[0].content[0].prompt_cache_breakpoint, prompt_cache_retention"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := p.post(t, tc.path, tc.body)
			if resp.StatusCode != 200 {
				t.Fatalf("%d %s", resp.StatusCode, body)
			}
			up := fb.bodies[len(fb.bodies)-1]
			if up["model"] != tc.model || fmt.Sprint(up["service_tier"]) != fmt.Sprint(map[bool]any{true: tc.tier, false: nil}[tc.tier != ""]) {
				t.Errorf("upstream model %v tier %v; want %s %q", up["model"], up["service_tier"], tc.model, tc.tier)
			}
			if got := resp.Header.Get("X-Ccproxy-Ignored-Params"); got != tc.ignored {
				t.Errorf("X-Ccproxy-Ignored-Params = %q; want %q", got, tc.ignored)
			}
		})
	}
}

// TestFallbackCatalog checks the built-in catalog against the one the Codex CLI 0.169.0
// bundles: the same models, with the same shape, efforts, tiers and modalities.
func TestFallbackCatalog(t *testing.T) {
	for _, m := range fallbackModels {
		want, ok := fixtureModels[m.Slug]
		if !ok {
			t.Errorf("%s is not in the Codex CLI's catalog", m.Slug)
			continue
		}
		if m.Lite != want.Lite || m.Visibility != cmp.Or(want.Visibility, "list") || fmt.Sprint(m.efforts()) != fmt.Sprint(want.efforts()) ||
			fmt.Sprint(m.tiers()) != fmt.Sprint(want.tiers()) || fmt.Sprint(m.Modalities) != fmt.Sprint(want.Modalities) ||
			fmt.Sprint(m.Summary != nil && !*m.Summary) != fmt.Sprint(want.Summary != nil && !*want.Summary) {
			t.Errorf("built-in %s = %+v; want %+v", m.Slug, m, want)
		}
	}
	if len(fallbackModels) != len(fixtureModels) {
		t.Errorf("built-in catalog has %d models; the Codex CLI's has %d (with spark)", len(fallbackModels), len(fixtureModels))
	}
}

// overloaded is the backend's in-stream overload (openai/codex#43337): a 200 stream that
// reports the failure after response.created and response.in_progress.
func overloaded(code, message string) []string {
	return []string{
		sse("response.created", map[string]any{"response": map[string]any{"id": "resp_o", "status": "in_progress"}}),
		sse("response.in_progress", map[string]any{"response": map[string]any{"id": "resp_o", "status": "in_progress"}}),
		sse("error", map[string]any{"error": map[string]any{"type": "service_unavailable_error", "code": code, "message": message, "param": nil}}),
		sse("response.failed", map[string]any{"response": map[string]any{"id": "resp_o", "status": "failed",
			"error": map[string]any{"code": code, "message": message}}}),
	}
}

// TestInStreamOverload: overload reported inside a 200 stream before any output is retried
// like a 5xx; when it persists the client gets an HTTP 503 (or 429) with Retry-After, not a 200
// stream with an error in it.
func TestInStreamOverload(t *testing.T) {
	busy := "Our servers are currently overloaded. Please try again later."
	tests := []struct {
		name       string
		failures   int // attempts that fail before one succeeds
		code, msg  string
		wantStatus int
		wantRetry  string
	}{
		{"overload then success", 1, "server_is_overloaded", busy, 200, ""},
		{"slow_down twice then success", 2, "slow_down", busy, 200, ""},
		{"overload throughout", 99, "server_is_overloaded", busy, 503, "1"},
		{"rate limit throughout", 99, "rate_limit_exceeded", "Rate limit reached. Please try again in 2.5s.", 429, "3"},
	}
	for _, tc := range tests {
		for _, path := range []string{"/codex/v1/chat/completions", "/codex/v1/responses"} {
			for _, stream := range []bool{false, true} {
				t.Run(fmt.Sprintf("%s %s stream=%v", tc.name, path, stream), func(t *testing.T) {
					calls := 0
					fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
						if calls++; calls <= tc.failures {
							writeEvents(w, overloaded(tc.code, tc.msg))
							return
						}
						writeEvents(w, textReply("resp_1", "fine"))
					})
					p := newProxy(t, fb)
					resp, body := p.post(t, path, fmt.Sprintf(`{"model":"gpt-5.5","stream":%v,"input":"hi","messages":[{"role":"user","content":"hi"}]}`, stream))
					if resp.StatusCode != tc.wantStatus || resp.Header.Get("Retry-After") != tc.wantRetry {
						t.Fatalf("%d Retry-After %q:\n%s\nwant %d, Retry-After %q", resp.StatusCode, resp.Header.Get("Retry-After"), body, tc.wantStatus, tc.wantRetry)
					}
					if tc.wantStatus == 200 && (!strings.Contains(body, "fine") || strings.Count(body, "event: response.created") > 1 || strings.Contains(body, tc.code)) {
						t.Errorf("answer after the retry:\n%s\nwant it once, without the failed attempt", body)
					}
					if want := min(tc.failures+1, 4); calls != want {
						t.Errorf("backend called %d times; want %d", calls, want)
					}
				})
			}
		}
	}
}

// TestCloudflareChallenge: a challenge page is a 502 that names Cloudflare and what to try,
// after one more try with the cookies it set.
func TestCloudflareChallenge(t *testing.T) {
	calls := 0
	fb := newFakeBackend(t, nil)
	fb.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls++
		if c, err := r.Cookie("__cf_bm"); calls > 1 && (err != nil || c.Value != "abc") {
			t.Errorf("retry without the cookie Cloudflare set: %v", err)
		}
		http.SetCookie(w, &http.Cookie{Name: "__cf_bm", Value: "abc", Path: "/"})
		w.Header().Set("Cf-Mitigated", "challenge")
		w.Header().Set("Content-Type", "text/html")
		w.WriteHeader(403)
		io.WriteString(w, "<!DOCTYPE html><html><title>Just a moment...</title></html>")
	})
	p := newProxy(t, fb)
	p.up.client = newUpstreamClient()
	resp, body := p.post(t, "/codex/v1/chat/completions", `{"model":"gpt-5.5","messages":[{"role":"user","content":"hi"}]}`)
	if resp.StatusCode != 502 || !strings.Contains(body, "Cloudflare") || !strings.Contains(body, "another network") || calls != 2 {
		t.Errorf("%d %s after %d calls; want 502 naming Cloudflare after 2", resp.StatusCode, body, calls)
	}
}

// TestUsage: GET /codex/usage answers from the backend's usage endpoint before the first
// completion, and from the x-codex-* headers after; `ccproxy usage` prints the windows.
func TestUsage(t *testing.T) {
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		writeEvents(w, textReply("resp_1", "ok"))
	})
	fb.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/wham/usage" && r.Header.Get("Authorization") == "Bearer "+testAccessToken {
			io.WriteString(w, `{"plan_type":"pro","rate_limit":{"primary_window":{"used_percent":31,"limit_window_seconds":18000,"reset_after_seconds":8040,"reset_at":1796400000},`+
				`"secondary_window":{"used_percent":20,"limit_window_seconds":604800,"reset_after_seconds":443000}},"credits":{"has_credits":false}}`)
			return
		}
		fb.serve(w, r)
	})
	p := newProxy(t, fb)
	_, body := p.get(t, "/codex/usage")
	if got := decode(t, body); got["plan"] != "pro" || jsonPath(got, "primary", "window_minutes") != 300.0 || jsonPath(got, "secondary", "used_percent") != 20.0 {
		t.Errorf("usage before any reply = %s; want the usage endpoint's pro plan", body)
	}
	p.post(t, "/codex/v1/chat/completions", `{"model":"gpt-5.5","messages":[{"role":"user","content":"hi"}]}`)
	if _, body = p.get(t, "/codex/usage"); decode(t, body)["plan"] != "plus" ||
		jsonPath(decode(t, body), "credits", "balance") != 0.0 || jsonPath(decode(t, body), "credits", "has_credits") != false {
		t.Errorf("usage after a reply = %s; want the headers' plus plan, no credits, balance 0", body)
	}
	env := map[string]string{"CODEX_HOME": filepath.Dir(p.cfg.authPath), "CCPROXY_HOME": t.TempDir(), "CCPROXY_UPSTREAM_URL": fb.URL + "/codex"}
	stdout, stderr, code := runCmd(t, env, "usage")
	if code != 0 || !strings.Contains(stdout, "plan pro") || !regexp.MustCompile(`5-hour\s+31% used, resets in 2h14m`).MatchString(stdout) ||
		!strings.Contains(stdout, "weekly") {
		t.Errorf("ccproxy usage: exit %d\n%s%s", code, stdout, stderr)
	}
	if stdout, _, _ := runCmd(t, env, "usage", "--json"); !strings.Contains(stdout, `"used_percent":31`) {
		t.Errorf("ccproxy usage --json:\n%s", stdout)
	}
}

// TestPromptCacheKey: a chat request without a session gets a prompt_cache_key and session
// header derived from the conversation's opening and the client's key, the same on every turn
// of a client that resends its history.
func TestPromptCacheKey(t *testing.T) {
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		writeEvents(w, textReply("resp_1", "ok"))
	})
	p := newProxy(t, fb)
	turn1 := `{"model":"gpt-5.5","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}`
	turn2 := `{"model":"gpt-5.5","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},{"role":"assistant","content":"ok"},{"role":"user","content":"again"}]}`
	other := `{"model":"gpt-5.5","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hello"}]}`
	var keys []string
	for _, r := range []struct{ body, key string }{{turn1, "k1"}, {turn2, "k1"}, {turn1, "k2"}, {other, "k1"}} {
		resp, _ := p.post(t, "/codex/v1/chat/completions", r.body, "Authorization", "Bearer "+r.key)
		up, h := fb.bodies[len(fb.bodies)-1], fb.heads[len(fb.heads)-1]
		if up["prompt_cache_key"] != h.Get("Session-Id") || resp.Header.Get("X-Session-Id") != h.Get("Session-Id") {
			t.Errorf("prompt_cache_key %v, upstream session %q, X-Session-Id %q; want one id", up["prompt_cache_key"], h.Get("Session-Id"), resp.Header.Get("X-Session-Id"))
		}
		keys = append(keys, h.Get("Session-Id"))
	}
	if keys[0] != keys[1] || keys[0] == keys[2] || keys[0] == keys[3] {
		t.Errorf("cache keys %q; want the first two equal, the others different", keys)
	}
}

// TestUnknownEventsTolerated: response.metadata and events ccproxy does not know reach native
// clients and are skipped for chat.
func TestUnknownEventsTolerated(t *testing.T) {
	events := textReply("resp_1", "ok")
	events = append(events[:1], append([]string{
		sse("response.metadata", map[string]any{"metadata": map[string]any{"model_reroute": nil}, "headers": map[string]any{"openai-model": "gpt-5.5"}}),
		sse("codex.rate_limits", map[string]any{"primary": map[string]any{"used_percent": 3}}),
	}, events[1:]...)...)
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) { writeEvents(w, events) })
	p := newProxy(t, fb)
	_, body := p.post(t, "/codex/v1/responses", `{"model":"gpt-5.5","stream":true,"input":"hi"}`)
	if !strings.Contains(body, "event: response.metadata") || !strings.Contains(body, "event: codex.rate_limits") || !strings.Contains(body, "event: response.completed") {
		t.Errorf("native stream:\n%s\nwant the unknown events relayed", body)
	}
	_, body = p.post(t, "/codex/v1/chat/completions", `{"model":"gpt-5.5","stream":true,"messages":[{"role":"user","content":"hi"}]}`)
	if strings.Contains(body, "metadata") || strings.Contains(body, "rate_limits") || !strings.HasSuffix(body, "data: [DONE]\n\n") {
		t.Errorf("chat stream:\n%s\nwant the unknown events skipped", body)
	}
}

// rawExchange writes req on a new connection to addr and returns what came back until the
// server closed the connection. The read deadline only keeps a broken server from hanging the
// test: every case expects the server to answer and close long before it.
func rawExchange(t *testing.T, addr, req string) string {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.WriteString(conn, req); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("reading the answer to %.40q: %v (the server did not close the connection)\n%s", req, err, got)
	}
	return string(got)
}

// TestHostileRequests: requests refused before their body is read are answered at once and
// their connection closed; a body that stalls is cut off; a broken body is the client's error.
func TestHostileRequests(t *testing.T) {
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		writeEvents(w, textReply("resp_1", "ok"))
	})
	keyed := newProxy(t, fb, func(c *config) { c.apiKey = "K"; c.bodyTimeout = 50 * time.Millisecond })
	open := newProxy(t, fb, func(c *config) { c.bodyTimeout = 50 * time.Millisecond })
	post := func(path, host, extra string) string {
		return "POST " + path + " HTTP/1.1\r\nHost: " + host + "\r\nContent-Type: application/json\r\n" + extra
	}
	tests := []struct {
		name, req string
		p         *proxy
		want      string
	}{
		{"foreign host, body never sent", post("/codex/v1/responses", "evil.example", "Content-Length: 100\r\n\r\n"), open, "HTTP/1.1 403"},
		{"no key, body never sent", post("/codex/v1/responses", "127.0.0.1", "Content-Length: 100\r\n\r\n"), keyed, "HTTP/1.1 401"},
		{"unknown route, body never sent", post("/nothing", "127.0.0.1", "Content-Length: 100\r\n\r\n"), open, "HTTP/1.1 404"},
		{"body stalls", post("/codex/v1/responses", "127.0.0.1", "Content-Length: 30000000\r\n\r\n{\"model\":"), open, "HTTP/1.1 408"},
		{"chunked body stalls", post("/codex/v1/responses", "127.0.0.1", "Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\n"), open, "HTTP/1.1 408"},
		{"malformed chunk", post("/codex/v1/responses", "127.0.0.1", "Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"), open, "HTTP/1.1 400"},
		{"declared too large", post("/codex/v1/responses", "127.0.0.1", "Content-Length: 40000000\r\n\r\n"), open, "HTTP/1.1 413"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := rawExchange(t, tc.p.Listener.Addr().String(), tc.req)
			if !strings.HasPrefix(got, tc.want) || !strings.Contains(got, `"error":{`) {
				t.Errorf("answer:\n%s\nwant %s with an OpenAI error", got, tc.want)
			}
		})
	}
	if strings.Contains(open.log.String(), "level=ERROR") {
		t.Errorf("client mistakes logged as errors:\n%s", open.log.String())
	}
}

// TestHostAndSchemeCase: Host names and the Bearer scheme compare case-insensitively, and a
// trailing dot makes no difference.
func TestHostAndSchemeCase(t *testing.T) {
	fb := newFakeBackend(t, nil)
	p := newProxy(t, fb)
	for _, host := range []string{"LOCALHOST", "Localhost:8000", "localhost.", "LocalHost.:8000", "127.0.0.1."} {
		req, _ := http.NewRequest("GET", p.URL+"/health", nil)
		req.Host = host
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Errorf("Host %q: %d; want 200", host, resp.StatusCode)
		}
	}
	keyed := newProxy(t, fb, func(c *config) { c.apiKey = "K" })
	for _, auth := range []string{"Bearer K", "bearer K", "BEARER K"} {
		req, _ := http.NewRequest("GET", keyed.URL+"/health", nil)
		req.Header.Set("Authorization", auth)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Errorf("Authorization %q: %d; want 200", auth, resp.StatusCode)
		}
	}
}

// TestBodiesInFlightBound: bodies beyond --max-inflight-bytes get a 503 with Retry-After at
// once; a small request beside them still goes through.
func TestBodiesInFlightBound(t *testing.T) {
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		writeEvents(w, textReply("resp_1", "ok"))
	})
	// Two 30 MB uploads that never send their bodies: only one fits in 40 MB. The other is
	// refused at once; the one that fits holds its bytes until its body is cut off.
	p := newProxy(t, fb, func(c *config) { c.maxInflight, c.bodyTimeout = 40<<20, 3*time.Second })
	answers := make(chan string, 2)
	for range 2 {
		go func() {
			answers <- rawExchange(t, p.Listener.Addr().String(),
				"POST /codex/v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 30000000\r\n\r\n{")
		}()
	}
	first := <-answers
	if !strings.HasPrefix(first, "HTTP/1.1 503") || !strings.Contains(first, "Retry-After: 5") || !strings.Contains(first, "max-inflight-bytes") {
		t.Errorf("first answer:\n%.400s\nwant a 503 with Retry-After naming the bound", first)
	}
	if resp, body := p.post(t, "/codex/v1/responses", `{"model":"gpt-5.5","input":"hi"}`); resp.StatusCode != 200 {
		t.Errorf("small request beside the upload: %d %s", resp.StatusCode, body)
	}
	if second := <-answers; !strings.HasPrefix(second, "HTTP/1.1 408") {
		t.Errorf("second answer:\n%.400s\nwant a 408 once its body stalled", second)
	}
}

// BenchmarkUploads sends 30 MB chat requests (an image inline, as clients send them) while a
// small request is timed beside them, and reports the peak heap: one upload alone ("one"; its
// peak over the size of the body is the cost of translating it), and 40 at once ("40", where
// --max-inflight-bytes turns most away with a 503).
//
//	go test -run '^$' -bench Uploads -benchtime 3x
func BenchmarkUploads(b *testing.B) {
	const size = 30 << 20
	image := base64.StdEncoding.EncodeToString(make([]byte, size*3/4-200))
	body := []byte(`{"model":"gpt-5.5","messages":[{"role":"user","content":[{"type":"text","text":"what is it?"},` +
		`{"type":"image_url","image_url":"data:image/png;base64,` + image + `"}]}]}`)
	for _, n := range []int{1, 40} {
		b.Run(map[int]string{1: "one", 40: "40"}[n], func(b *testing.B) {
			fb := newFakeBackend(b, func(w http.ResponseWriter, r *http.Request, _ map[string]any) {
				writeEvents(w, textReply("resp_1", "a picture"))
			})
			fb.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.Copy(io.Discard, r.Body) // the backend reads the image, it does not keep it
				writeEvents(w, textReply("resp_1", "a picture"))
			})
			p := newProxy(b, fb, func(c *config) { c.logLevel, c.maxInflight = slog.LevelInfo, 64<<20 }) // the defaults
			var peak, small []float64
			var ok, busy int
			for i := 0; i < b.N; i++ {
				runtime.GC()
				heap := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
				metrics.Read(heap)
				base := heap[0].Value.Uint64()
				stop, sampled := make(chan struct{}), make(chan uint64)
				go func() { // the peak, sampled every millisecond without stopping the world
					tick := time.NewTicker(time.Millisecond)
					defer tick.Stop()
					var top uint64
					for {
						select {
						case <-stop:
							sampled <- top
							return
						case <-tick.C:
						}
						metrics.Read(heap)
						top = max(top, heap[0].Value.Uint64())
					}
				}()
				var wg sync.WaitGroup
				var mu sync.Mutex
				for range n {
					wg.Add(1)
					go func() {
						defer wg.Done()
						resp, err := http.Post(p.URL+"/codex/v1/chat/completions", "application/json", bytes.NewReader(body))
						if err != nil {
							return
						}
						io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
						mu.Lock()
						defer mu.Unlock()
						if resp.StatusCode == 200 {
							ok++
						} else if resp.StatusCode == 503 {
							busy++
						}
					}()
				}
				for range 20 {
					t0 := time.Now()
					if resp, err := http.Post(p.URL+"/codex/v1/chat/completions", "application/json",
						strings.NewReader(`{"model":"gpt-5.5","messages":[{"role":"user","content":"hi"}]}`)); err == nil {
						io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
					}
					small = append(small, float64(time.Since(t0))/float64(time.Millisecond))
				}
				wg.Wait()
				close(stop)
				peak = append(peak, float64(<-sampled-base))
			}
			slices.Sort(small)
			b.ReportMetric(slices.Max(peak)/(1<<20), "peak-heap-MiB")
			b.ReportMetric(slices.Max(peak)/float64(n*len(body)), "peak/body")
			b.ReportMetric(small[len(small)*99/100], "small-p99-ms")
			b.ReportMetric(float64(ok)/float64(b.N), "ok/op")
			b.ReportMetric(float64(busy)/float64(b.N), "503/op")
			b.ReportMetric(0, "ns/op")
		})
	}
}

// reasonedReply answers with a reasoning item (encrypted) and a message, both with ids.
func reasonedReply(respID, text string) []string {
	rs := map[string]any{"id": "rs_" + respID, "type": "reasoning", "summary": []any{}, "encrypted_content": "gAAA-" + respID}
	msg := map[string]any{"id": "msg_" + respID, "type": "message", "role": "assistant",
		"content": []any{map[string]any{"type": "output_text", "text": text}}}
	return []string{
		sse("response.created", map[string]any{"response": map[string]any{"id": respID, "output": []any{}}}),
		sse("response.output_item.done", map[string]any{"output_index": 0, "item": rs}),
		sse("response.output_item.done", map[string]any{"output_index": 1, "item": msg}),
		sse("response.completed", map[string]any{"response": map[string]any{"id": respID, "status": "completed",
			"model": "gpt-5.5", "output": []any{rs, msg}}}),
	}
}

// TestStoredResponses: the Responses store as the OpenAI SDKs and the Vercel AI SDK use it:
// item_reference expansion, retrieve, input_items, delete, and what store:false means.
func TestStoredResponses(t *testing.T) {
	n := 0
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		n++
		writeEvents(w, reasonedReply(fmt.Sprintf("resp_%d", n), fmt.Sprintf("answer %d", n)))
	})
	p := newProxy(t, fb)
	_, body := p.post(t, "/codex/v1/responses", `{"model":"gpt-5.5","input":"My name is Alice","instructions":"be brief"}`)
	if got := decode(t, body); got["previous_response_id"] != nil || got["store"] != true || got["instructions"] != "be brief" {
		t.Errorf("first response %s; want previous_response_id null, store true and the instructions echoed", body)
	}
	// The Vercel AI SDK's second turn: earlier items by reference, no previous_response_id.
	_, body = p.post(t, "/codex/v1/responses", `{"model":"gpt-5.5","input":[{"role":"user","content":"My name is Alice"},
		{"type":"item_reference","id":"rs_resp_1"},{"type":"item_reference","id":"msg_resp_1"},{"role":"user","content":"What is my name?"}]}`)
	in := jsonString(fb.bodies[1]["input"])
	if !strings.Contains(in, `"encrypted_content":"gAAA-resp_1"`) || !strings.Contains(in, "answer 1") || strings.Contains(in, "item_reference") || strings.Contains(in, `"id"`) {
		t.Errorf("expanded input %s; want the reasoning and the message, without ids", in)
	}
	if !strings.Contains(body, "answer 2") {
		t.Errorf("second response %s; want the answer", body)
	}
	resp, body := p.post(t, "/codex/v1/responses", `{"model":"gpt-5.5","input":[{"type":"item_reference","id":"msg_nope"}]}`)
	if resp.StatusCode != 404 || !strings.Contains(body, "Item with id 'msg_nope' not found.") {
		t.Errorf("unknown reference: %d %s; want 404", resp.StatusCode, body)
	}
	_, body = p.post(t, "/codex/v1/responses", `{"model":"gpt-5.5","input":"and again","previous_response_id":"resp_2"}`)
	if got := decode(t, body); got["previous_response_id"] != "resp_2" {
		t.Errorf("chained response %s; want previous_response_id resp_2", body)
	}
	for _, path := range []string{"/codex/v1/responses/resp_3", "/codex/responses/resp_3"} {
		if _, body := p.get(t, path); decode(t, body)["output_text"] != "answer 3" || decode(t, body)["previous_response_id"] != "resp_2" {
			t.Errorf("GET %s = %s; want the stored response", path, body)
		}
	}
	_, body = p.get(t, "/codex/v1/responses/resp_2/input_items?order=asc&limit=2")
	items := decode(t, body)
	if data, _ := items["data"].([]any); len(data) != 2 || items["has_more"] != true || jsonPath(data, 0, "content") != "My name is Alice" {
		t.Errorf("input_items = %s; want the first two of four, in order", body)
	}
	_, body = p.get(t, "/codex/v1/responses/resp_2/input_items?order=asc&after="+fmt.Sprint(items["last_id"]))
	if data, _ := decode(t, body)["data"].([]any); len(data) != 2 || !strings.Contains(jsonString(data[1]), "What is my name?") {
		t.Errorf("input_items after %v = %s; want the last two", items["last_id"], body)
	}
	req, _ := http.NewRequest("DELETE", p.URL+"/codex/v1/responses/resp_3", nil)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 200 {
		t.Fatalf("DELETE: %v %v", resp, err)
	}
	for _, path := range []string{"/codex/v1/responses/resp_3", "/codex/v1/responses/resp_3/input_items", "/codex/v1/responses/nope"} {
		if resp, body := p.get(t, path); resp.StatusCode != 404 || !strings.Contains(body, `"error":{`) {
			t.Errorf("GET %s after delete: %d %s; want 404", path, resp.StatusCode, body)
		}
	}
	if resp, body := p.post(t, "/codex/v1/responses", `{"model":"gpt-5.5","input":"x","previous_response_id":"resp_3"}`); resp.StatusCode != 404 {
		t.Errorf("previous_response_id of a deleted response: %d %s; want 404", resp.StatusCode, body)
	}
	// store:false keeps nothing without a named session, and everything in one.
	_, body = p.post(t, "/codex/v1/responses", `{"model":"gpt-5.5","input":"secret","store":false}`)
	if decode(t, body)["store"] != false {
		t.Errorf("store:false response %s; want store false echoed", body)
	}
	if resp, _ := p.get(t, "/codex/v1/responses/resp_4"); resp.StatusCode != 404 {
		t.Errorf("a store:false response was kept")
	}
	p.post(t, "/codex/named/responses", `{"model":"gpt-5.5","input":"kept","store":false}`)
	if resp, _ := p.get(t, "/codex/v1/responses/resp_5"); resp.StatusCode != 200 {
		t.Errorf("a store:false response in a named session was not kept")
	}
}

// TestDanglingToolCalls: a turn that ended in a call the client never answers does not wedge
// the conversation: the next request gets an aborted output for it, as the Codex CLI closes an
// interrupted turn, on every path that keeps a conversation.
func TestDanglingToolCalls(t *testing.T) {
	tools := `"tools":[{"type":"function","name":"get_weather","parameters":{"type":"object","properties":{}}}]`
	tests := []struct{ name, path, first, second string }{
		{"chat session", "/codex/chat1/chat/completions",
			`{"model":"gpt-5.5","messages":[{"role":"user","content":"weather?"}]}`,
			`{"model":"gpt-5.5","messages":[{"role":"user","content":"never mind, hi"}]}`},
		{"responses session", "/codex/resp1/responses",
			`{"model":"gpt-6-sol",` + tools + `,"input":"weather?"}`, `{"model":"gpt-6-sol",` + tools + `,"input":"never mind"}`},
		{"previous_response_id", "/codex/v1/responses",
			`{"model":"gpt-5.5",` + tools + `,"input":"weather?"}`, `{"model":"gpt-5.5",` + tools + `,"input":"never mind","previous_response_id":"resp_1"}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n := 0
			fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
				if n++; n == 1 {
					writeEvents(w, callReply("resp_1"))
				} else {
					writeEvents(w, textReply("resp_2", "ok then"))
				}
			})
			p := newProxy(t, fb)
			p.post(t, tc.path, tc.first)
			resp, body := p.post(t, tc.path, tc.second)
			if resp.StatusCode != 200 || !strings.Contains(body, "ok then") {
				t.Fatalf("second turn: %d %s", resp.StatusCode, body)
			}
			if in := jsonString(fb.bodies[1]["input"]); !strings.Contains(in, `{"call_id":"call_w","output":"aborted","type":"function_call_output"}`) &&
				!strings.Contains(in, `{"type":"function_call_output","call_id":"call_w","output":"aborted"}`) {
				t.Errorf("second upstream input %s; want the call closed as aborted", in)
			}
		})
	}
}

// TestNamedSessionsOutliveAutomatic: automatic sessions (unnamed Responses requests) never
// evict a session the client named.
func TestNamedSessionsOutliveAutomatic(t *testing.T) {
	n := 0
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		n++
		writeEvents(w, textReply(fmt.Sprintf("resp_%d", n), "ok"))
	})
	p := newProxy(t, fb, func(c *config) { c.maxSessions = 3 })
	for _, name := range []string{"alice", "bob"} {
		if resp, body := p.post(t, "/codex/"+name+"/responses", `{"model":"gpt-5.5","input":"hi"}`); resp.StatusCode != 200 {
			t.Fatalf("%s: %d %s", name, resp.StatusCode, body)
		}
	}
	for i := range 5 {
		if resp, body := p.post(t, "/codex/v1/responses", `{"model":"gpt-5.5","input":"hi"}`); resp.StatusCode != 200 {
			t.Fatalf("unnamed %d: %d %s", i, resp.StatusCode, body)
		}
	}
	for _, name := range []string{"alice", "bob"} {
		if resp, _ := p.get(t, "/codex/sessions/"+name); resp.StatusCode != 200 {
			t.Errorf("session %s was evicted for automatic ones", name)
		}
	}
	if resp, body := p.post(t, "/codex/carol/responses", `{"model":"gpt-5.5","input":"hi"}`); resp.StatusCode != 200 {
		t.Errorf("a new named session: %d %s; want room made from the automatic one", resp.StatusCode, body)
	}
}

// TestInvalidUTF8: raw invalid UTF-8 in request text becomes U+FFFD on every path, so neither
// the backend nor the session file sees it.
func TestInvalidUTF8(t *testing.T) {
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		writeEvents(w, textReply("resp_1", "ok"))
	})
	p := newProxy(t, fb)
	for _, req := range []struct{ path, body string }{
		{"/codex/u1/responses", "{\"model\":\"gpt-5.5\",\"input\":[{\"role\":\"user\",\"content\":\"bad \xff\xfe bytes\"}]}"},
		{"/codex/u2/chat/completions", "{\"model\":\"gpt-5.5\",\"messages\":[{\"role\":\"user\",\"content\":\"bad \xff\xfe bytes\"}]}"},
	} {
		if resp, body := p.post(t, req.path, req.body); resp.StatusCode != 200 {
			t.Fatalf("%s: %d %s", req.path, resp.StatusCode, body)
		}
		if in := jsonString(fb.bodies[len(fb.bodies)-1]["input"]); !strings.Contains(in, "bad \uFFFD") {
			t.Errorf("%s upstream input %s; want U+FFFD", req.path, in)
		}
		file, _ := os.ReadFile(filepath.Join(p.cfg.home, "sessions", strings.Split(req.path, "/")[2]+".json"))
		if !utf8.Valid(file) || !json.Valid(file) {
			t.Errorf("%s: session file is not valid UTF-8 JSON:\n%q", req.path, file)
		}
	}
}

// thinkingReply is a turn with a streamed reasoning summary, then text.
func thinkingReply(respID, thought, text string) []string {
	rs := map[string]any{"id": "rs_1", "type": "reasoning", "summary": []any{map[string]any{"type": "summary_text", "text": thought}},
		"encrypted_content": "gAAAA-" + respID}
	msg := map[string]any{"id": "msg_1", "type": "message", "role": "assistant", "content": []any{map[string]any{"type": "output_text", "text": text}}}
	return []string{
		sse("response.created", map[string]any{"response": map[string]any{"id": respID}}),
		sse("response.output_item.added", map[string]any{"output_index": 0, "item": map[string]any{"id": "rs_1", "type": "reasoning"}}),
		sse("response.reasoning_summary_text.delta", map[string]any{"item_id": "rs_1", "output_index": 0, "summary_index": 0, "delta": thought}),
		sse("response.output_item.done", map[string]any{"output_index": 0, "item": rs}),
		sse("response.output_text.delta", map[string]any{"item_id": "msg_1", "output_index": 1, "delta": text}),
		sse("response.output_item.done", map[string]any{"output_index": 1, "item": msg}),
		sse("response.completed", map[string]any{"response": map[string]any{"id": respID, "status": "completed", "output": []any{rs, msg},
			"usage": map[string]any{"input_tokens": 100, "input_tokens_details": map[string]any{"cached_tokens": 60}, "output_tokens": 7}}}),
	}
}

// anthropicEvents reads an Anthropic stream: the name and data of each event.
func anthropicEvents(t *testing.T, body string) (names []string, data []map[string]any) {
	rd := newSSEReader(strings.NewReader(body))
	for {
		name, d, err := rd.next()
		if err != nil {
			return names, data
		}
		names = append(names, string(name))
		data = append(data, decode(t, string(d)))
	}
}

// TestAnthropicMessages drives the Messages API as Claude Code does: a streamed turn with
// thinking, a tool use and its result, the same turn without a stream, and the errors.
func TestAnthropicMessages(t *testing.T) {
	n := 0
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		switch n++; n {
		case 1:
			writeEvents(w, thinkingReply("resp_1", "The user greets.", "Hello!"))
		case 2:
			writeEvents(w, callReply("resp_2"))
		default:
			writeEvents(w, textReply("resp_3", "It is 18C."))
		}
	})
	p := newProxy(t, fb, func(c *config) { c.apiKey = "K" })
	post := func(body string) (*http.Response, string) {
		return p.post(t, "/codex/v1/messages?beta=true", body, "x-api-key", "K", "anthropic-version", "2023-06-01")
	}
	tools := `"tools":[{"name":"get_weather","description":"Weather","input_schema":{"type":"object","properties":{"city":{"type":"string"}}}}]`
	resp, body := post(`{"model":"claude-sonnet-4-5-20250929","max_tokens":32000,"stream":true,"thinking":{"type":"enabled","budget_tokens":4000},` +
		tools + `,"messages":[{"role":"user","content":"hi"}]}`)
	names, data := anthropicEvents(t, body)
	want := "message_start content_block_start content_block_delta content_block_delta content_block_stop content_block_start content_block_delta content_block_stop message_delta message_stop"
	if resp.StatusCode != 200 || strings.Join(names, " ") != want {
		t.Fatalf("stream %d:\n%s\nwant events %s", resp.StatusCode, body, want)
	}
	if jsonPath(data[0], "message", "model") != "claude-sonnet-4-5-20250929" || jsonPath(data[3], "delta", "signature") != "gAAAA-resp_1" ||
		jsonPath(data[8], "usage", "cache_read_input_tokens") != 60.0 || jsonPath(data[8], "usage", "input_tokens") != 40.0 {
		t.Errorf("stream events %v; want the model echoed, the signature and the usage", data)
	}
	if up := fb.bodies[0]; up["model"] != "gpt-6-sol" || jsonPath(up, "reasoning", "effort") != "low" || fb.heads[0].Get("X-Openai-Internal-Codex-Responses-Lite") != "true" {
		t.Errorf("upstream %v; want gpt-6-sol in the Lite shape with medium effort", up)
	}
	// The tool use, not streamed, and its result in the next turn (ids kept, is_error said).
	_, body = post(`{"model":"claude-sonnet-4-5-20250929","max_tokens":100,` + tools + `,"messages":[{"role":"user","content":"weather?"}]}`)
	if msg := decode(t, body); msg["stop_reason"] != "tool_use" || jsonPath(msg, "content", 0, "id") != "call_w" ||
		jsonPath(msg, "content", 0, "input", "city") != "Paris" {
		t.Errorf("tool use message %s; want the call with its input", body)
	}
	_, body = post(`{"model":"claude-sonnet-4-5-20250929","max_tokens":100,` + tools + `,"messages":[{"role":"user","content":"weather?"},
		{"role":"assistant","content":[{"type":"tool_use","id":"call_w","name":"get_weather","input":{"city":"Paris"}}]},
		{"role":"user","content":[{"type":"tool_result","tool_use_id":"call_w","content":"unreachable","is_error":true}]}]}`)
	if in := jsonString(fb.bodies[2]["input"]); !strings.Contains(in, `"call_id":"call_w"`) || !strings.Contains(in, "Error: unreachable") ||
		!strings.Contains(body, "It is 18C.") {
		t.Errorf("tool result turn: upstream %s, answer %s", in, body)
	}
	resp, body = post(`{"model":"claude-sonnet-4-5-20250929","messages":[]}`)
	if resp.StatusCode != 400 || decode(t, body)["type"] != "error" || jsonPath(decode(t, body), "error", "type") != "invalid_request_error" {
		t.Errorf("bad request: %d %s; want a 400 in the Anthropic shape", resp.StatusCode, body)
	}
	resp, body = p.post(t, "/codex/v1/messages", `{}`, "x-api-key", "wrong")
	if resp.StatusCode != 401 || jsonPath(decode(t, body), "error", "type") != "authentication_error" ||
		resp.Header.Get("X-Should-Retry") != "false" {
		t.Errorf("wrong key: %d %s %v; want 401 authentication_error, not to be retried", resp.StatusCode, body, resp.Header)
	}
	resp, body = p.post(t, "/codex/v1/messages/count_tokens", `{"model":"claude-haiku-4-5","messages":[{"role":"user","content":"hello there"}]}`, "x-api-key", "K")
	if tokens, _ := decode(t, body)["input_tokens"].(float64); resp.StatusCode != 200 || tokens < 5 || tokens > 50 {
		t.Errorf("count_tokens: %d %s; want an estimate", resp.StatusCode, body)
	}
}

// TestAnthropicStreamFailure: a failure after the stream began ends it with an Anthropic error
// event; one before it is an HTTP error; overload never becomes Anthropic's 529.
func TestAnthropicStreamFailure(t *testing.T) {
	for _, tc := range []struct {
		name   string
		events []string
		status int
		want   string
	}{
		{"mid-stream", append(textReply("resp_1", "Hel")[:3], sse("response.failed", map[string]any{"response": map[string]any{
			"error": map[string]any{"code": "server_error", "message": "boom"}}})), 200, `event: error`},
		{"overloaded throughout", overloaded("server_is_overloaded", "busy"), 503, `"overloaded_error"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) { writeEvents(w, tc.events) })
			p := newProxy(t, fb)
			resp, body := p.post(t, "/codex/v1/messages", `{"model":"claude-haiku-4-5","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"hi"}]}`)
			if resp.StatusCode != tc.status || !strings.Contains(body, tc.want) || strings.Contains(body, "message_stop") {
				t.Errorf("%d:\n%s\nwant %d with %s and no message_stop", resp.StatusCode, body, tc.status, tc.want)
			}
		})
	}
}

// imageReply draws one picture: partial images, then the image_generation_call item.
func imageReply(respID, result string) []string {
	img := map[string]any{"id": "ig_1", "type": "image_generation_call", "status": "completed", "result": result,
		"revised_prompt": "a cat on a mat, watercolour"}
	return []string{
		sse("response.created", map[string]any{"response": map[string]any{"id": respID}}),
		sse("response.output_item.added", map[string]any{"output_index": 0, "item": map[string]any{"id": "ig_1", "type": "image_generation_call"}}),
		sse("response.image_generation_call.partial_image", map[string]any{"item_id": "ig_1", "partial_image_index": 0, "partial_image_b64": "cGFydA=="}),
		sse("response.output_item.done", map[string]any{"output_index": 0, "item": img}),
		sse("response.completed", map[string]any{"response": map[string]any{"id": respID, "status": "completed", "output": []any{img},
			"usage": map[string]any{"input_tokens": 20, "output_tokens": 1000}}}),
	}
}

// TestImages: the Images API runs turns with the backend's image tool; an answer without an
// image is an error with the model's words; a failure or the client leaving ends it all.
func TestImages(t *testing.T) {
	tests := []struct {
		name, body string
		reply      func(n int) []string
		status     int
		want       []string
		calls      int
	}{
		{"one image", `{"model":"gpt-image-1","prompt":"a cat","size":"1024x1024"}`, func(int) []string { return imageReply("resp_1", "aW1hZ2U=") },
			200, []string{`"b64_json":"aW1hZ2U="`, `"revised_prompt":"a cat on a mat, watercolour"`, `"total_tokens":1020`}, 1},
		{"n = 2", `{"prompt":"a cat","n":2}`, func(n int) []string { return imageReply(fmt.Sprint("resp_", n), fmt.Sprint("aW1n", n)) },
			200, []string{`"b64_json":"aW1n`, `"total_tokens":2040`}, 2},
		{"refusal", `{"prompt":"something forbidden"}`, func(int) []string { return textReply("resp_1", "I can't draw that.") },
			400, []string{`"code":"no_image"`, "I can't draw that."}, 1},
		{"failure mid-generation", `{"prompt":"a cat"}`, func(int) []string {
			return append(imageReply("resp_1", "x")[:3], sse("response.failed", map[string]any{"response": map[string]any{
				"error": map[string]any{"code": "server_error", "message": "the image tool failed"}}}))
		}, 502, []string{"the image tool failed"}, 1},
		{"url", `{"prompt":"a cat","response_format":"url"}`, nil, 400, []string{`"param":"response_format"`}, 0},
		{"text-only model", `{"model":"gpt-5.3-codex-spark","prompt":"a cat"}`, nil, 400,
			[]string{`"param":"model"`, "cannot draw", "--image-model"}, 0},
		{"effort the model lacks", `{"model":"gpt-5.5:ultra","prompt":"a cat"}`, nil, 400,
			[]string{`"param":"reasoning.effort"`}, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			n := 0
			fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
				mu.Lock()
				defer mu.Unlock()
				if n++; tc.reply != nil {
					writeEvents(w, tc.reply(n))
				}
			})
			p := newProxy(t, fb)
			resp, body := p.post(t, "/codex/v1/images/generations", tc.body)
			if resp.StatusCode != tc.status || len(fb.bodies) != tc.calls {
				t.Fatalf("%d after %d calls: %.300s; want %d after %d", resp.StatusCode, len(fb.bodies), body, tc.status, tc.calls)
			}
			for _, w := range tc.want {
				if !strings.Contains(body, w) {
					t.Errorf("body %.300s; want %s", body, w)
				}
			}
			if tc.calls > 0 && (fb.bodies[0]["model"] != "gpt-5.5" || !strings.Contains(jsonString(fb.bodies[0]["tools"]), `"type":"image_generation"`)) {
				t.Errorf("upstream %v; want gpt-5.5 with the image_generation tool", fb.bodies[0])
			}
			if strings.Contains(p.log.String(), "aW1") {
				t.Errorf("an image reached the log:\n%s", p.log.String())
			}
		})
	}
}

// TestImagesClientLeaves: the client leaving during generation cancels the backend's request.
func TestImagesClientLeaves(t *testing.T) {
	reached, canceled := make(chan struct{}), make(chan struct{})
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		writeEvents(w, imageReply("resp_1", "x")[:3])
		close(reached)
		<-r.Context().Done()
		close(canceled)
	})
	p := newProxy(t, fb)
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		req, _ := http.NewRequestWithContext(ctx, "POST", p.URL+"/codex/v1/images/generations", strings.NewReader(`{"prompt":"a cat"}`))
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	<-reached
	cancel()
	<-canceled // the test times out if the backend's request is never canceled
}

// TestNativeImageTool: a Responses client that asks for the image tool itself gets the image
// events and items as the backend sent them.
func TestNativeImageTool(t *testing.T) {
	fb := newFakeBackend(t, func(w http.ResponseWriter, r *http.Request, body map[string]any) {
		writeEvents(w, imageReply("resp_1", "aW1hZ2U="))
	})
	p := newProxy(t, fb)
	_, body := p.post(t, "/codex/v1/responses", `{"model":"gpt-5.5","stream":true,"tools":[{"type":"image_generation"}],"input":"a cat"}`)
	if !strings.Contains(body, "event: response.image_generation_call.partial_image") || !strings.Contains(body, `"result":"aW1hZ2U="`) {
		t.Errorf("stream:\n%.600s\nwant the image events and item relayed", body)
	}
	_, body = p.post(t, "/codex/v1/responses", `{"model":"gpt-5.5","tools":[{"type":"image_generation"}],"input":"a cat"}`)
	if got := decode(t, body); jsonPath(got, "output", 0, "type") != "image_generation_call" || jsonPath(got, "output", 0, "result") != "aW1hZ2U=" {
		t.Errorf("response %.400s; want the image_generation_call item", body)
	}
	if strings.Contains(p.log.String(), "aW1hZ2U=") {
		t.Errorf("an image reached the log:\n%s", p.log.String())
	}
}
