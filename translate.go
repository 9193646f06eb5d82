// This file holds the pure translations: a client request (Chat Completions, Responses,
// Anthropic Messages or Images) becomes a call, a call becomes the one upstream request,
// backend events become a turn, and a turn becomes each client API's answer. Nothing here
// does I/O or reads a clock: ids and times are passed in.

package main

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"net/http"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"
)

// reasoningMode is how reasoning summaries appear in chat completions (--reasoning).
type reasoningMode string

const (
	reasoningTags  reasoningMode = "tags"
	reasoningField reasoningMode = "field"
	reasoningNone  reasoningMode = "none"
)

func (m *reasoningMode) UnmarshalText(b []byte) error {
	if s := reasoningMode(b); s == reasoningTags || s == reasoningField || s == reasoningNone {
		*m = s
		return nil
	}
	return errors.New("want tags, field or none")
}

func (m reasoningMode) MarshalText() ([]byte, error) { return []byte(m), nil }

// encryptedReasoning is the include value that makes the backend return reasoning items it
// can read back with store=false, so a later turn can carry them.
const encryptedReasoning = "reasoning.encrypted_content"

// The client APIs a call can come in.
const (
	apiResponses = iota
	apiChat
	apiMessages // Anthropic
	apiImages
)

// call is one client request in the backend's terms, whichever API it came in.
type call struct {
	api          int      // which API the client spoke, and is answered in
	clientModel  string   // the model as the client named it, for Anthropic answers
	stream       bool     // the client asked for a stream
	includeUsage bool     // chat: stream_options.include_usage
	jsonMode     bool     // chat: response_format asks for JSON, so never reasoning tags
	ignored      []string // members not sent upstream, sorted (X-Ccproxy-Ignored-Params)
	previousID   string   // previous_response_id: the session store expands it
	store        *bool    // store: false means the answer is not kept (unless in a named session)

	model        string
	input        []json.RawMessage
	instructions *string // the client's system prompt, when it came as "instructions"
	tools        []json.RawMessage
	toolChoice   json.RawMessage
	parallel     *bool
	reasoning    object
	text         json.RawMessage
	include      []string
	cacheKey     string
	metadata     json.RawMessage
	tier         string      // service_tier: priority or default
	lite         bool        // the client sent the Responses Lite header itself
	header       http.Header // the client's headers that travel upstream
}

func (c *call) ignore(name string) {
	if !slices.Contains(c.ignored, name) {
		c.ignored = append(c.ignored, name)
		slices.Sort(c.ignored)
	}
}

// object is a JSON object decoded one level deep.
type object map[string]json.RawMessage

// rawJSON keeps a JSON value as the bytes of the request body, not a copy, since an inline image
// is most of a large body. Request bodies are read once and never changed.
type rawJSON []byte

func (r *rawJSON) UnmarshalJSON(b []byte) error {
	*r = b
	return nil
}

// chatParams are the Chat Completions members parseChat translates (n is only checked).
var chatParams = []string{"model", "messages", "stream", "stream_options", "tools", "tool_choice",
	"parallel_tool_calls", "response_format", "reasoning_effort", "verbosity", "service_tier"}

var responsesParams = []string{"model", "input", "instructions", "tools", "tool_choice",
	"parallel_tool_calls", "reasoning", "text", "include", "prompt_cache_key", "client_metadata",
	"stream", "previous_response_id", "service_tier", "store"}

// decodeBody decodes a JSON object into v and returns its non-null members outside known,
// sorted: the backend answers those with 400 "Unsupported parameter", so they are dropped, and
// the client is told. store:false is not listed: it is what the backend gets anyway.
func decodeBody(body []byte, known []string, v any) ([]string, error) {
	var o map[string]rawJSON
	if json.Unmarshal(body, &o) != nil || o == nil {
		// OpenAI answers a body it cannot parse with param null: there is no parameter to name.
		return nil, invalid("", "We could not parse the JSON body of your request: expected a JSON object.")
	}
	var ignored []string
	for k, raw := range o {
		if !slices.Contains(known, k) && !isNull(raw) && (k != "store" || string(raw) != "false") {
			ignored = append(ignored, k)
		}
	}
	slices.Sort(ignored)
	return ignored, decodeParam(body, "", v)
}

// jsonKinds names the JSON type each Go kind decodes from, for "Invalid type" messages.
var jsonKinds = map[reflect.Kind]string{reflect.String: "a string", reflect.Bool: "a boolean",
	reflect.Int: "an integer", reflect.Slice: "an array", reflect.Struct: "an object"}

// decodeParam unmarshals raw into v. A member of the wrong type is a 400 naming it, param plus
// the path encoding/json reports, as OpenAI names them ("stream_options.include_usage").
func decodeParam(raw []byte, param string, v any) error {
	err := json.Unmarshal(raw, v)
	if te, ok := errors.AsType[*json.UnmarshalTypeError](err); ok {
		kind := cmp.Or(jsonKinds[te.Type.Kind()], te.Type.String())
		return wrongType(strings.Trim(param+"."+te.Field, "."), kind)
	} else if err != nil {
		return invalid(param, "We could not parse the JSON body of your request.")
	}
	return nil
}

func isNull(raw []byte) bool { return len(raw) == 0 || string(raw) == "null" }

// marshal encodes v without HTML escaping (the bytes go to APIs, not to browsers).
func marshal(v any) json.RawMessage {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	// Only structs, strings, maps and already-valid RawMessages are encoded here.
	_ = enc.Encode(v)
	return bytes.TrimSuffix(b.Bytes(), []byte("\n"))
}

func invalid(param, format string, args ...any) error {
	return &apiError{kind: errInvalid, param: param, msg: fmt.Sprintf(format, args...)}
}

func missing(param string) error {
	return invalid(param, "Missing required parameter: '%s'.", param)
}

func wrongType(param, want string) error {
	return invalid(param, "Invalid type for '%s': expected %s.", param, want)
}

// newCall checks the model and fills what every call sends. A model id may carry an effort
// suffix and "-fast", which means the priority tier (Codex's "Fast").
func newCall(model, tier string, ignored []string) (*call, string, error) {
	if model == "" {
		return nil, "", missing("model")
	}
	base, fast := strings.CutSuffix(model, "-fast")
	base, effort := splitEffort(base)
	if b, ok := strings.CutSuffix(base, "-fast"); ok {
		base, fast = b, true
	}
	c := &call{model: base, toolChoice: json.RawMessage(`"auto"`), include: []string{encryptedReasoning},
		ignored: slices.DeleteFunc(ignored, func(k string) bool { return k == "service_tier" })}
	// The backend knows only priority (Codex's "Fast") and default.
	switch tier {
	case "", "default":
		c.tier = tier
	case "fast", "priority":
		c.tier = "priority"
	default:
		c.ignore("service_tier")
	}
	if fast {
		c.tier = "priority"
	}
	return c, effort, nil
}

// splitEffort removes a reasoning-effort suffix, as peers accept: "-high", and ":" also for max
// and ultra. "-max" and "-mini" are never suffixes: gpt-5.1-codex-max and -mini are models.
func splitEffort(model string) (base, effort string) {
	efforts := []string{"none", "minimal", "low", "medium", "high", "xhigh", "max", "ultra"}
	if i := strings.LastIndexByte(model, ':'); i > 0 && slices.Contains(efforts, model[i+1:]) {
		return model[:i], model[i+1:]
	}
	if i := strings.LastIndexByte(model, '-'); i > 0 && slices.Contains(efforts[:6], model[i+1:]) {
		return model[:i], model[i+1:]
	}
	return model, ""
}

type textPart struct {
	Type string `json:"type"`
	Text string `json:"text"`
}

type messageItem struct {
	Type    string `json:"type"`
	Role    string `json:"role"`
	Content []any  `json:"content"`
}

// message encodes a message item. An image's URL is appended as the client sent it: a data URL
// is most of a large body, and encoding/json would copy it twice more on the way.
func message(role string, parts ...any) json.RawMessage {
	size, images := 0, false
	for _, p := range parts {
		if img, ok := p.(inputImage); ok {
			size, images = size+len(img.ImageURL), true
		}
	}
	if !images {
		return marshal(messageItem{"message", role, parts})
	}
	b := fmt.Appendf(make([]byte, 0, size+1024), `{"type":"message","role":%s,"content":[`, marshal(role))
	for i, p := range parts {
		if i > 0 {
			b = append(b, ',')
		}
		img, ok := p.(inputImage)
		if !ok {
			b = append(b, marshal(p)...)
			continue
		}
		b = append(append(b, `{"type":"input_image","image_url":`...), img.ImageURL...)
		if img.Detail != "" {
			b = append(append(b, `,"detail":`...), marshal(img.Detail)...)
		}
		b = append(b, '}')
	}
	return append(b, "]}"...)
}

type functionCall struct {
	Type      string `json:"type"`
	Name      string `json:"name"`
	Arguments string `json:"arguments"`
	CallID    string `json:"call_id"`
}

type callOutput struct {
	Type   string `json:"type"`
	CallID string `json:"call_id"`
	Output string `json:"output"`
}

// functionDef is the function of a chat tool; with a type beside it, a Responses tool.
type functionDef struct {
	Name        string          `json:"name"`
	Description string          `json:"description,omitempty"`
	Parameters  json.RawMessage `json:"parameters"`
	Strict      bool            `json:"strict"`
}

// functionTool is a flat Responses function tool; a missing schema is an empty object schema.
func functionTool(f functionDef) json.RawMessage {
	if isNull(f.Parameters) {
		f.Parameters = json.RawMessage(`{"type":"object","properties":{}}`)
	}
	return marshal(struct {
		Type string `json:"type"`
		functionDef
	}{"function", f})
}

// jsonSchema is response_format.json_schema; with a type beside it, text.format.
type jsonSchema struct {
	Name        string          `json:"name"`
	Description string          `json:"description,omitempty"`
	Strict      bool            `json:"strict"`
	Schema      json.RawMessage `json:"schema"`
}

type chatRequest struct {
	Model         string    `json:"model"`
	Messages      []rawJSON `json:"messages"`
	N             int       `json:"n"`
	Stream        bool      `json:"stream"`
	StreamOptions struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	Tools []struct {
		Type     string       `json:"type"`
		Function *functionDef `json:"function"`
	} `json:"tools"`
	ToolChoice        json.RawMessage `json:"tool_choice"`
	ParallelToolCalls bool            `json:"parallel_tool_calls"`
	ResponseFormat    struct {
		Type       string     `json:"type"`
		JSONSchema jsonSchema `json:"json_schema"`
	} `json:"response_format"`
	ReasoningEffort string `json:"reasoning_effort"`
	Verbosity       string `json:"verbosity"`
	ServiceTier     string `json:"service_tier"`
}

type chatMessage struct {
	Role       string  `json:"role"`
	Content    rawJSON `json:"content"`
	ToolCallID string  `json:"tool_call_id"`
	ToolCalls  []struct {
		ID       string `json:"id"`
		Function struct {
			Name      string `json:"name"`
			Arguments string `json:"arguments"`
		} `json:"function"`
	} `json:"tool_calls"`
}

type chatPart struct {
	Type, Text, Refusal string
	ImageURL            rawJSON         `json:"image_url"`
	Cache               json.RawMessage `json:"cache_control"`           // Anthropic-style prompt caching:
	Breakpoint          json.RawMessage `json:"prompt_cache_breakpoint"` // refused by the backend
}

func parseChat(body []byte) (*call, error) {
	r := chatRequest{N: 1}
	ignored, err := decodeBody(body, chatParams, &r)
	if err != nil {
		return nil, err
	}
	c, effort, err := newCall(r.Model, r.ServiceTier, ignored)
	if err != nil {
		return nil, err
	}
	if r.N != 1 {
		return nil, invalid("n", "Invalid value for 'n': ccproxy supports only n=1, got %d.", r.N)
	}
	if len(r.Messages) == 0 {
		return nil, missing("messages")
	}
	for i, raw := range r.Messages {
		if err := c.chatItems(json.RawMessage(raw), "messages["+strconv.Itoa(i)+"]"); err != nil {
			return nil, err
		}
	}
	if c.tools, err = chatTools(&r); err != nil {
		return nil, err
	}
	if c.toolChoice, err = chatToolChoice(r.ToolChoice); err != nil {
		return nil, err
	}
	if c.text, c.jsonMode, err = chatText(&r); err != nil {
		return nil, err
	}
	c.api, c.stream = apiChat, r.Stream
	c.includeUsage = r.StreamOptions.IncludeUsage && r.Stream
	// false is the chat default, and what Codex sends for model families without parallel calls.
	c.parallel = &r.ParallelToolCalls
	// An explicit reasoning_effort beats the model-name suffix; summary "auto" is what Codex sends.
	c.reasoning = object{"summary": json.RawMessage(`"auto"`)}
	if e := cmp.Or(r.ReasoningEffort, effort); e != "" {
		c.reasoning["effort"] = marshal(e)
	}
	return c, nil
}

// chatTools turns the nested chat tools into the flat Responses tools: the backend answers the
// nested shape with "Missing required parameter: 'tools[0].name'".
func chatTools(r *chatRequest) ([]json.RawMessage, error) {
	var tools []json.RawMessage
	for i, t := range r.Tools {
		p := "tools[" + strconv.Itoa(i) + "]"
		if t.Type != "function" {
			return nil, invalid(p+".type",
				"Invalid value for '%s.type': only function tools are supported, got %q.", p, t.Type)
		}
		if t.Function == nil || t.Function.Name == "" {
			return nil, missing(p + ".function.name")
		}
		tools = append(tools, functionTool(*t.Function))
	}
	return tools, nil
}

func (c *call) chatItems(raw json.RawMessage, param string) error {
	var m chatMessage
	if err := decodeParam(raw, param, &m); err != nil {
		return err
	}
	// The backend answers role system with "System messages are not allowed"; only user
	// messages take images; assistant text is output_text.
	role, textType := m.Role, "input_text"
	switch m.Role {
	case "system":
		role = "developer"
	case "assistant":
		textType = "output_text"
	case "developer", "user":
	case "tool":
		return c.chatToolOutput(&m, param)
	case "":
		return missing(param + ".role")
	default:
		return invalid(param+".role", "Invalid value for '%s.role': %q is not supported.", param, m.Role)
	}
	parts, err := c.chatContent(json.RawMessage(m.Content), param, textType, role == "user")
	if err != nil {
		return err
	}
	if len(parts) > 0 { // an assistant turn that only called tools has no message
		c.input = append(c.input, message(role, parts...))
	}
	// Calls follow the message, the order the backend produced them in.
	for j, tc := range m.ToolCalls {
		if tc.ID == "" || tc.Function.Name == "" {
			p := param + ".tool_calls[" + strconv.Itoa(j) + "]"
			return invalid(p, "Missing required parameter: '%s.id' or '%s.function.name'.", p, p)
		}
		fc := functionCall{"function_call", tc.Function.Name, tc.Function.Arguments, tc.ID}
		c.input = append(c.input, marshal(fc))
	}
	return nil
}

// chatToolOutput appends a tool message as a function_call_output with the text of its parts.
func (c *call) chatToolOutput(m *chatMessage, param string) error {
	if m.ToolCallID == "" {
		return missing(param + ".tool_call_id")
	}
	parts, err := c.chatContent(json.RawMessage(m.Content), param, "input_text", false)
	var out strings.Builder
	for _, p := range parts {
		out.WriteString(p.(textPart).Text)
	}
	c.input = append(c.input, marshal(callOutput{"function_call_output", m.ToolCallID, out.String()}))
	return err
}

// chatContent converts message content (a string or an array of parts) to Responses parts of
// textType; images are allowed only where the backend takes them (user messages).
func (c *call) chatContent(raw json.RawMessage, param, textType string, images bool) ([]any, error) {
	var s string
	if isNull(raw) || raw[0] == '"' && json.Unmarshal(raw, &s) == nil {
		if s == "" {
			return nil, nil
		}
		return []any{textPart{textType, s}}, nil
	}
	var parts []chatPart
	if err := json.Unmarshal(raw, &parts); err != nil {
		return nil, wrongType(param+".content", "a string or an array of content parts")
	}
	var out []any
	for j, p := range parts {
		pp := param + ".content[" + strconv.Itoa(j) + "]"
		if !isNull(p.Cache) {
			c.ignore(pp + ".cache_control")
		}
		if !isNull(p.Breakpoint) {
			c.ignore(pp + ".prompt_cache_breakpoint")
		}
		switch {
		case p.Type == "text":
			out = append(out, textPart{textType, p.Text})
		case p.Type == "refusal" && textType == "output_text":
			out = append(out, textPart{textType, p.Refusal})
		case p.Type == "image_url" && images:
			img, err := chatImage(json.RawMessage(p.ImageURL), pp)
			if err != nil {
				return nil, err
			}
			out = append(out, img)
		default:
			return nil, invalid(pp+".type", "Invalid value for '%s.type': %q is not supported here.",
				pp, p.Type)
		}
	}
	return out, nil
}

// inputImage is an input_image part: the backend wants image_url as a plain string, here the
// JSON string as the client sent it (a data URL is most of a large body: it is not decoded).
type inputImage struct {
	Type     string          `json:"type"`
	ImageURL json.RawMessage `json:"image_url"`
	Detail   string          `json:"detail,omitempty"`
}

// chatImage reads an image_url member: a URL string or {"url", "detail"}.
func chatImage(raw json.RawMessage, param string) (inputImage, error) {
	img := inputImage{Type: "input_image", ImageURL: raw}
	var v struct {
		URL    rawJSON
		Detail string
	}
	if len(raw) > 0 && raw[0] == '{' && json.Unmarshal(raw, &v) == nil {
		img.ImageURL, img.Detail = json.RawMessage(v.URL), v.Detail
	}
	if len(img.ImageURL) < 3 || img.ImageURL[0] != '"' {
		return img, invalid(param+".image_url",
			"Invalid value for '%s.image_url': expected a URL string or {\"url\": …}.", param)
	}
	return img, nil
}

// chatToolChoice maps tool_choice: strings pass, {type:function,function:{name}} is flattened
// like the tools themselves, other objects pass unchanged; Codex's default is "auto".
func chatToolChoice(raw json.RawMessage) (json.RawMessage, error) {
	var tc struct {
		Type     string
		Function struct{ Name string }
	}
	var s string
	switch {
	case isNull(raw):
		return json.RawMessage(`"auto"`), nil
	case json.Unmarshal(raw, &s) == nil:
		return marshal(s), nil
	case json.Unmarshal(raw, &tc) != nil:
		return nil, wrongType("tool_choice", "a string or an object")
	case tc.Type == "function" && tc.Function.Name != "":
		return fmt.Appendf(nil, `{"type":"function","name":%s}`, marshal(tc.Function.Name)), nil
	}
	return raw, nil
}

// chatText maps response_format to text.format and verbosity to text.verbosity.
func chatText(r *chatRequest) (json.RawMessage, bool, error) {
	text := struct {
		Format    any    `json:"format,omitempty"`
		Verbosity string `json:"verbosity,omitempty"`
	}{Verbosity: r.Verbosity}
	switch js := r.ResponseFormat.JSONSchema; r.ResponseFormat.Type {
	case "", "text":
	case "json_object":
		text.Format = map[string]string{"type": "json_object"}
	case "json_schema":
		if len(js.Schema) == 0 {
			return nil, false, missing("response_format.json_schema.schema")
		}
		js.Name = cmp.Or(js.Name, "response")
		text.Format = struct {
			Type string `json:"type"`
			jsonSchema
		}{"json_schema", js}
	default:
		return nil, false, invalid("response_format.type",
			"Invalid value for 'response_format.type': %q is not supported.", r.ResponseFormat.Type)
	}
	if text.Format == nil && text.Verbosity == "" {
		return nil, false, nil
	}
	return marshal(text), text.Format != nil, nil
}

type responsesRequest struct {
	Model              string            `json:"model"`
	Input              rawJSON           `json:"input"`
	Instructions       *string           `json:"instructions"`
	Tools              []json.RawMessage `json:"tools"`
	ToolChoice         json.RawMessage   `json:"tool_choice"`
	ParallelToolCalls  *bool             `json:"parallel_tool_calls"`
	Reasoning          json.RawMessage   `json:"reasoning"`
	Text               json.RawMessage   `json:"text"`
	Include            []string          `json:"include"`
	PromptCacheKey     string            `json:"prompt_cache_key"`
	ClientMetadata     json.RawMessage   `json:"client_metadata"`
	Stream             bool              `json:"stream"`
	PreviousResponseID string            `json:"previous_response_id"`
	ServiceTier        string            `json:"service_tier"`
	Store              *bool             `json:"store"`
}

// parseResponses normalizes a native Responses body. A body with "messages" and no "input" is
// a chat request, which some clients send to /responses.
func parseResponses(body []byte) (*call, error) {
	var r responsesRequest
	ignored, err := decodeBody(body, responsesParams, &r)
	if err != nil {
		return nil, err
	}
	if isNull(r.Input) && slices.Contains(ignored, "messages") {
		return parseChat(body)
	}
	c, effort, err := newCall(r.Model, r.ServiceTier, ignored)
	if err != nil {
		return nil, err
	}
	// Tools of every type (function, custom, namespace, web_search…) are the client's business.
	c.tools, c.instructions, c.parallel = r.Tools, r.Instructions, r.ParallelToolCalls
	c.cacheKey, c.stream, c.previousID, c.store = r.PromptCacheKey, r.Stream, r.PreviousResponseID, r.Store
	if err := c.responsesInput(json.RawMessage(r.Input)); err != nil {
		return nil, err
	}
	if c.include = r.Include; !slices.Contains(c.include, encryptedReasoning) {
		c.include = append(c.include, encryptedReasoning)
	}
	for _, m := range []struct {
		key string
		raw json.RawMessage
		dst *json.RawMessage
	}{{"tool_choice", r.ToolChoice, &c.toolChoice}, {"reasoning", r.Reasoning, nil},
		{"text", r.Text, &c.text}, {"client_metadata", r.ClientMetadata, &c.metadata}} {
		switch {
		case isNull(m.raw):
		case m.raw[0] != '{' && (m.key != "tool_choice" || m.raw[0] != '"'):
			return nil, wrongType(m.key, "an object")
		case m.dst != nil:
			*m.dst = m.raw
		default:
			_ = json.Unmarshal(m.raw, &c.reasoning) // an object, checked above
		}
	}
	if effort != "" && isNull(c.reasoning["effort"]) {
		if c.reasoning == nil {
			c.reasoning = object{}
		}
		c.reasoning["effort"] = marshal(effort)
	}
	return c, nil
}

// responsesInput takes input (a string or items) as normalized items. The tools of an
// additional_tools item (the Lite shape) join the call's tools, which buildRequest places as
// the model wants. item_reference items stay: the session store expands them.
func (c *call) responsesInput(raw json.RawMessage) error {
	var s string
	var items []rawJSON
	switch {
	case isNull(raw):
	case json.Unmarshal(raw, &s) == nil:
		if s != "" {
			c.input = []json.RawMessage{message("user", textPart{"input_text", s})}
			return nil
		}
	case json.Unmarshal(raw, &items) != nil:
		return wrongType("input", "a string or an array")
	}
	if len(items) == 0 {
		return missing("input")
	}
	for i, item := range items {
		p := "input[" + strconv.Itoa(i) + "]"
		o, err := c.normalizeItem(json.RawMessage(item), p)
		switch {
		case err != nil:
			return wrongType(p, "an object")
		case string(o["type"]) == `"additional_tools"`:
			var tools []json.RawMessage
			json.Unmarshal(o["tools"], &tools)
			c.tools = append(c.tools, tools...)
		default:
			c.input = append(c.input, marshal(o))
		}
	}
	return nil
}

// normalizeItem makes an input item acceptable with store=false: no "id" (the backend answers
// ids it issued with 404 "Item with id … not found"), no role "system" ("System messages are
// not allowed"), a type on the message shorthand, and no prompt-caching keys in content parts.
// Its marshalled bytes are canonical, so sessions can compare transcripts.
func (c *call) normalizeItem(item json.RawMessage, param string) (object, error) {
	var o object
	if err := json.Unmarshal(item, &o); err != nil || o == nil {
		return nil, errors.New("not an object")
	}
	if string(o["type"]) != `"item_reference"` { // its id is what it names
		delete(o, "id")
	}
	if r, ok := o["role"]; ok {
		if string(r) == `"system"` {
			o["role"] = json.RawMessage(`"developer"`)
		}
		if _, ok := o["type"]; !ok {
			o["type"] = json.RawMessage(`"message"`)
		}
	}
	var parts []object
	content := o["content"]
	if !bytes.Contains(content, []byte(`"cache_control"`)) &&
		!bytes.Contains(content, []byte(`"prompt_cache_breakpoint"`)) ||
		json.Unmarshal(content, &parts) != nil {
		return o, nil
	}
	for j, p := range parts {
		for _, k := range []string{"cache_control", "prompt_cache_breakpoint"} {
			if _, ok := p[k]; ok {
				delete(p, k)
				c.ignore(fmt.Sprintf("%s.content[%d].%s", param, j, k))
			}
		}
	}
	o["content"] = marshal(parts)
	return o, nil
}

// claudeModels maps the family of a claude-* model id to a Codex model (--anthropic-models):
// "opus=gpt-6.1-sol,sonnet=gpt-6-sol,haiku=gpt-6-luna".
type claudeModels map[string]string

func (m *claudeModels) UnmarshalText(b []byte) error {
	*m = claudeModels{}
	for _, pair := range strings.Split(string(b), ",") {
		family, model, ok := strings.Cut(strings.TrimSpace(pair), "=")
		if !ok || family == "" || model == "" {
			return errors.New("want family=model pairs such as opus=gpt-6.1-sol,sonnet=gpt-6-sol")
		}
		(*m)[family] = model
	}
	return nil
}

func (m claudeModels) MarshalText() ([]byte, error) {
	var pairs []string
	for _, f := range slices.Sorted(maps.Keys(m)) {
		pairs = append(pairs, f+"="+m[f])
	}
	return []byte(strings.Join(pairs, ",")), nil
}

// codexModel is the Codex model for a claude-* id: its family's (sonnet's when the family is
// unknown); other ids pass unchanged.
func (m claudeModels) codexModel(model string) string {
	if !strings.HasPrefix(model, "claude") {
		return model
	}
	for family, codex := range m {
		if strings.Contains(model, family) {
			return codex
		}
	}
	return cmp.Or(m["sonnet"], model)
}

type anthropicBlock struct {
	Type      string           `json:"type"`
	Text      string           `json:"text"`
	Thinking  string           `json:"thinking"`
	Signature string           `json:"signature"`
	ID        string           `json:"id"`
	Name      string           `json:"name"`
	Input     json.RawMessage  `json:"input"`
	ToolUseID string           `json:"tool_use_id"`
	Content   rawJSON          `json:"content"`
	IsError   bool             `json:"is_error"`
	Cache     json.RawMessage  `json:"cache_control"`
	Source    *anthropicSource `json:"source"`
}

type anthropicSource struct {
	Type      string  `json:"type"`
	MediaType string  `json:"media_type"`
	Data      rawJSON `json:"data"`
	URL       string  `json:"url"`
}

type anthropicRequest struct {
	Model    string  `json:"model"`
	System   rawJSON `json:"system"`
	Messages []struct {
		Role    string  `json:"role"`
		Content rawJSON `json:"content"`
	} `json:"messages"`
	Tools []struct {
		Type        string          `json:"type"`
		Name        string          `json:"name"`
		Description string          `json:"description,omitempty"`
		InputSchema json.RawMessage `json:"input_schema"`
	} `json:"tools"`
	ToolChoice *struct {
		Type            string `json:"type"`
		Name            string `json:"name"`
		DisableParallel bool   `json:"disable_parallel_tool_use"`
	} `json:"tool_choice"`
	Thinking *struct {
		Type   string `json:"type"`
		Budget int    `json:"budget_tokens"`
	} `json:"thinking"`
	Stream bool `json:"stream"`
}

// parseMessages translates an Anthropic Messages body; a thinking budget becomes a reasoning
// effort with summaries, which come back as thinking blocks. metadata is dropped silently;
// max_tokens, temperature, stop_sequences and the like are dropped and named.
func parseMessages(body []byte, models claudeModels) (*call, error) {
	var r anthropicRequest
	ignored, err := decodeBody(body, []string{"model", "system", "messages", "tools", "tool_choice",
		"thinking", "stream", "metadata"}, &r)
	if err != nil {
		return nil, err
	}
	c, effort, err := newCall(models.codexModel(r.Model), "", ignored)
	if err != nil {
		return nil, err
	}
	c.api, c.clientModel, c.stream = apiMessages, r.Model, r.Stream
	if len(r.Messages) == 0 {
		return nil, invalid("messages", "messages: Field required")
	}
	if err := c.anthropicItems("system", "developer", r.System); err != nil {
		return nil, err
	}
	for i, m := range r.Messages {
		if m.Role != "user" && m.Role != "assistant" {
			return nil, invalid(fmt.Sprintf("messages[%d].role", i),
				"messages.%d.role: Input should be 'user' or 'assistant'", i)
		}
		if err := c.anthropicItems(fmt.Sprintf("messages[%d].content", i), m.Role, m.Content); err != nil {
			return nil, err
		}
	}
	c.anthropicTools(&r)
	c.reasoning = object{}
	if th := r.Thinking; th != nil && th.Type == "enabled" {
		c.reasoning["summary"] = json.RawMessage(`"auto"`)
		switch {
		case effort != "":
		case th.Budget < 4096:
			effort = "low"
		case th.Budget < 16384:
			effort = "medium"
		case th.Budget < 32768:
			effort = "high"
		default:
			effort = "xhigh"
		}
	}
	if effort != "" {
		c.reasoning["effort"] = marshal(effort)
	}
	return c, nil
}

func (c *call) anthropicTools(r *anthropicRequest) {
	for i, t := range r.Tools {
		switch {
		case t.Type == "" || t.Type == "custom":
			c.tools = append(c.tools, functionTool(functionDef{t.Name, t.Description, t.InputSchema, false}))
		case strings.HasPrefix(t.Type, "web_search"):
			c.tools = append(c.tools, json.RawMessage(`{"type":"web_search"}`))
		default: // Anthropic's other server tools have no Codex counterpart
			c.ignore(fmt.Sprintf("tools[%d]", i))
		}
	}
	tc := r.ToolChoice
	c.parallel = new(tc == nil || !tc.DisableParallel)
	switch {
	case tc == nil:
	case tc.Type == "tool":
		c.toolChoice = marshal(map[string]string{"type": "function", "name": tc.Name})
	default:
		c.toolChoice = marshal(map[string]string{"auto": "auto", "any": "required", "none": "none"}[tc.Type])
	}
}

// anthropicItems appends a message's blocks (or the system prompt's) as input items. A
// thinking block whose signature is the backend's encrypted reasoning becomes the reasoning
// item it came from.
func (c *call) anthropicItems(param, role string, content rawJSON) error {
	var blocks []anthropicBlock
	var s string
	switch {
	case isNull(content):
	case content[0] == '"' && json.Unmarshal(content, &s) == nil:
		blocks = []anthropicBlock{{Type: "text", Text: s}}
	default:
		if err := decodeParam(json.RawMessage(content), param, &blocks); err != nil {
			return err
		}
	}
	textType := "input_text"
	if role == "assistant" {
		textType = "output_text"
	}
	var parts []any
	flush := func() {
		if len(parts) > 0 {
			c.input = append(c.input, message(role, parts...))
			parts = nil
		}
	}
	for j, b := range blocks {
		bp := fmt.Sprintf("%s[%d]", param, j)
		if !isNull(b.Cache) {
			c.ignore(bp + ".cache_control")
		}
		var item any
		switch {
		case b.Type == "text":
			parts = append(parts, textPart{textType, b.Text})
		case b.Type == "image" && role == "user" && b.Source != nil:
			parts = append(parts, anthropicImage(b.Source))
		case b.Type == "redacted_thinking" ||
			b.Type == "thinking" && !strings.HasPrefix(b.Signature, "gAAAA"):
			// Not the backend's encrypted reasoning: it could not read it.
		case b.Type == "tool_result" && role == "user":
			item = toolResult(&b)
		case b.Type == "tool_use" && role == "assistant":
			args := string(b.Input)
			if isNull(b.Input) {
				args = "{}"
			}
			item = functionCall{"function_call", b.Name, args, b.ID}
		case b.Type == "thinking" && role == "assistant":
			item = map[string]any{"type": "reasoning", "encrypted_content": b.Signature,
				"summary": []textPart{{"summary_text", b.Thinking}}}
		default:
			return invalid(bp+".type", "%s.type: %q is not supported here", bp, b.Type)
		}
		if item != nil {
			flush()
			c.input = append(c.input, marshal(item))
		}
	}
	flush()
	return nil
}

// anthropicImage copies base64 data into the data URL as it came, without decoding it.
func anthropicImage(src *anthropicSource) inputImage {
	if src.Type == "url" || len(src.Data) < 2 || strings.ContainsAny(src.MediaType, `"\`) {
		return inputImage{Type: "input_image", ImageURL: marshal(src.URL)}
	}
	url := append([]byte(`"data:`+src.MediaType+`;base64,`), src.Data[1:]...)
	return inputImage{Type: "input_image", ImageURL: url}
}

func toolResult(b *anthropicBlock) any {
	var blocks []anthropicBlock
	var text string
	if json.Unmarshal(b.Content, &text) != nil && json.Unmarshal(b.Content, &blocks) == nil {
		for _, part := range blocks {
			text += part.Text
		}
	}
	if b.IsError {
		text = "Error: " + text
	}
	parts := []any{textPart{"input_text", text}}
	for _, part := range blocks {
		if part.Type == "image" && part.Source != nil {
			parts = append(parts, anthropicImage(part.Source))
		}
	}
	if len(parts) == 1 {
		return callOutput{"function_call_output", b.ToolUseID, text}
	}
	return map[string]any{"type": "function_call_output", "call_id": b.ToolUseID, "output": parts}
}

type imageRequest struct {
	Prompt         string `json:"prompt"`
	Model          string `json:"model"`
	N              int    `json:"n"`
	Size           string `json:"size"`
	Quality        string `json:"quality"`
	Background     string `json:"background"`
	OutputFormat   string `json:"output_format"`
	ResponseFormat string `json:"response_format"`
}

// parseImages translates an Images API body into the call of one turn that draws with the
// backend's image_generation tool, and the number of turns (images) asked for. model is the
// Codex model that draws; an image model id of OpenAI's API (gpt-image-1, dall-e-3) means it.
func parseImages(body []byte, model string) (*call, int, error) {
	r := imageRequest{N: 1}
	ignored, err := decodeBody(body, []string{"prompt", "model", "n", "size", "quality", "background",
		"output_format", "response_format"}, &r)
	switch {
	case err != nil:
		return nil, 0, err
	case r.Prompt == "":
		return nil, 0, missing("prompt")
	case r.ResponseFormat != "" && r.ResponseFormat != "b64_json":
		return nil, 0, invalid("response_format", "Invalid value for 'response_format': "+
			"ccproxy has no URL to give; the images come back as b64_json (omit response_format).")
	case r.N < 1 || r.N > 10:
		return nil, 0, invalid("n", "Invalid value for 'n': expected an integer from 1 to 10.")
	}
	if r.Model != "" && !strings.HasPrefix(r.Model, "gpt-image") && !strings.HasPrefix(r.Model, "dall-e") {
		model = r.Model
	}
	c, effort, err := newCall(model, "", ignored)
	if err != nil {
		return nil, 0, err
	}
	c.api, c.clientModel = apiImages, r.Model
	c.instructions = new("Draw what the user describes with the image_generation tool, once, " +
		"and answer with nothing else.")
	tool := map[string]string{"type": "image_generation", "output_format": cmp.Or(r.OutputFormat, "png"),
		"size": r.Size, "quality": r.Quality, "background": r.Background}
	maps.DeleteFunc(tool, func(_, v string) bool { return v == "" })
	c.tools = []json.RawMessage{marshal(tool)}
	c.input = []json.RawMessage{message("user", textPart{"input_text", r.Prompt})}
	if effort != "" {
		c.reasoning = object{"effort": marshal(effort)}
	}
	return c, r.N, nil
}

// imagesAnswer is the Images API answer of finished turns. A turn that drew nothing is an
// error that carries what the model said.
func imagesAnswer(turns []*turn, created int64) ([]byte, error) {
	type image struct {
		B64JSON       string `json:"b64_json"`
		RevisedPrompt string `json:"revised_prompt,omitempty"`
	}
	var data []image
	var in, out int
	for _, t := range turns {
		n := len(data)
		for _, raw := range t.items {
			var it struct {
				Type, Result  string
				RevisedPrompt string `json:"revised_prompt"`
			}
			if json.Unmarshal(raw, &it) == nil && it.Type == "image_generation_call" && it.Result != "" {
				data = append(data, image{it.Result, it.RevisedPrompt})
			}
		}
		if len(data) == n {
			said := cmp.Or(strings.TrimSpace(answerText(t)), "(no text either)")
			return nil, &apiError{kind: errInvalid, code: "no_image",
				msg: "the model answered without an image: " + said}
		}
		in, out = in+t.usage.InputTokens, out+t.usage.OutputTokens
	}
	usage := map[string]int{"input_tokens": in, "output_tokens": out, "total_tokens": in + out}
	return marshal(map[string]any{"created": created, "data": data, "usage": usage}), nil
}

// closeCalls answers every call from items[from:] that has no output with an "aborted" one,
// right after it, as the Codex CLI does after an interrupted turn (codex-rs/core/src/
// context_manager/normalize.rs, ensure_call_outputs_present): a turn that ended in tool calls
// the client never answered would otherwise make the backend refuse every later request.
func closeCalls(items []json.RawMessage, from int) []json.RawMessage {
	type item struct {
		Type   string `json:"type"`
		CallID string `json:"call_id"`
	}
	var calls []int
	answered := map[string]bool{}
	for i, raw := range items[from:] {
		var it item
		if !bytes.Contains(raw, []byte(`"call_id"`)) || json.Unmarshal(raw, &it) != nil {
			continue
		}
		if strings.HasSuffix(it.Type, "_output") {
			answered[it.CallID] = true
		} else {
			calls = append(calls, from+i)
		}
	}
	for j := len(calls) - 1; j >= 0; j-- {
		var it item
		json.Unmarshal(items[calls[j]], &it)
		if kind := "function_call_output"; !answered[it.CallID] {
			if it.Type == "custom_tool_call" {
				kind = "custom_tool_call_output"
			}
			out := marshal(callOutput{kind, it.CallID, "aborted"})
			items = slices.Insert(slices.Clip(items), calls[j]+1, out)
		}
	}
	return items
}

// upstreamBody is the body of POST {upstream}/responses, in the Codex CLI's member order
// (codex-rs/codex-api/src/common.rs ResponsesApiRequest).
type upstreamBody struct {
	Model             string            `json:"model"`
	Instructions      *string           `json:"instructions,omitempty"`
	Input             []json.RawMessage `json:"input"`
	Tools             json.RawMessage   `json:"tools,omitempty"` // [] when there are none, except in Lite
	ToolChoice        json.RawMessage   `json:"tool_choice,omitempty"`
	ParallelToolCalls *bool             `json:"parallel_tool_calls,omitempty"`
	Reasoning         object            `json:"reasoning,omitempty"`
	Store             bool              `json:"store"`  // always false: the backend refuses true
	Stream            bool              `json:"stream"` // always true: the backend only streams
	Include           []string          `json:"include,omitempty"`
	PromptCacheKey    string            `json:"prompt_cache_key,omitempty"`
	Text              json.RawMessage   `json:"text,omitempty"`
	ClientMetadata    json.RawMessage   `json:"client_metadata,omitempty"`
	ServiceTier       string            `json:"service_tier,omitempty"`
}

// request is built once by buildRequest and never changed after; the upstream client adds
// the credentials on each attempt.
type request struct {
	model  string
	body   []byte
	header http.Header
}

// prompt says how a request carries instructions: key is the "instructions" member (nil for
// none); with asMessage the client's instructions lead the input as a developer message, as
// the Codex CLI sends its prompt.
type prompt struct {
	key       *string
	asMessage bool
}

// liteHeader marks a request in the "Responses Lite" shape, which the Codex CLI 0.169.0 sends
// for every model whose catalog entry has use_responses_lite.
const liteHeader = "X-Openai-Internal-Codex-Responses-Lite"

// buildRequest is the one place an upstream request is made. input is the session's transcript
// and this turn, m the model's catalog entry (nil when unknown), and sid names the
// conversation for the prompt cache.
func buildRequest(c *call, input []json.RawMessage, m *catalogModel, p prompt, sid string) *request {
	b := upstreamBody{Model: c.model, Instructions: p.key, ToolChoice: c.toolChoice,
		ParallelToolCalls: c.parallel, Reasoning: maps.Clone(c.reasoning), Stream: true,
		Include: c.include, PromptCacheKey: cmp.Or(c.cacheKey, sid), Text: c.text,
		ClientMetadata: c.metadata, ServiceTier: c.tier}
	h := http.Header{"Accept": {"text/event-stream"}, "Session-Id": {sid}}
	maps.Copy(h, c.header)
	if m != nil && m.Summary != nil && !*m.Summary { // gpt-5.3-codex-spark refuses the member
		delete(b.Reasoning, "summary")
	}
	var head []json.RawMessage
	if c.lite || m != nil && m.Lite {
		// Lite: every tool in a leading additional_tools item and none at the top, no parallel
		// calls, reasoning over all turns. The backend refuses Lite requests that break these.
		h.Set(liteHeader, "true")
		if len(c.tools) > 0 {
			head = append(head, marshal(map[string]any{"type": "additional_tools", "role": "developer",
				"tools": c.tools}))
		}
		b.ParallelToolCalls = new(false)
		if b.Reasoning == nil {
			b.Reasoning = object{}
		}
		b.Reasoning["context"] = json.RawMessage(`"all_turns"`)
	} else {
		b.Tools = json.RawMessage("[]")
		if c.tools != nil {
			b.Tools = marshal(c.tools)
		}
	}
	if p.asMessage && c.instructions != nil && *c.instructions != "" {
		head = append(head, message("developer", textPart{"input_text", *c.instructions}))
	}
	// The items are already valid JSON, and may be most of a large body (an inline image): they
	// are copied once, into their place, rather than encoded again.
	body := marshal(b)
	at := bytes.Index(body, []byte(`"input":null`)) + len(`"input":`)
	size := len(body) + int(sizeOf(head)+sizeOf(input)) + len(head) + len(input) + 2
	out := append(make([]byte, 0, size), body[:at]...)
	out = append(out, '[')
	for i, it := range slices.Concat(head, input) {
		if i > 0 {
			out = append(out, ',')
		}
		out = append(out, it...)
	}
	out = append(append(out, ']'), body[at+len("null"):]...)
	return &request{model: c.model, body: out, header: h}
}

// check refuses, before any upstream call, what the model's catalog entry says it cannot take.
// A model the catalog does not know is the backend's to judge.
func check(c *call, m *catalogModel) error {
	if m == nil {
		return nil
	}
	var effort string
	json.Unmarshal(c.reasoning["effort"], &effort)
	if efforts := m.efforts(); effort != "" && efforts != nil && !slices.Contains(efforts, effort) {
		param := "reasoning.effort"
		if c.api == apiChat {
			param = "reasoning_effort"
		}
		return invalid(param, "Unsupported value: '%s' is not supported with the '%s' model. "+
			"Supported values are: %s.", effort, m.Slug, quoteList(efforts))
	}
	if c.api == apiImages && m.Modalities != nil && !slices.Contains(m.Modalities, "image") {
		return invalid("model", "The '%s' model cannot draw: it takes only %s. Name another model, "+
			"or set --image-model.", m.Slug, quoteList(m.Modalities))
	}
	hasImage := func(it json.RawMessage) bool { return bytes.Contains(it, []byte(`"input_image"`)) }
	if m.Modalities != nil && !slices.Contains(m.Modalities, "image") &&
		slices.ContainsFunc(c.input, hasImage) {
		param := "input"
		if c.api != apiResponses {
			param = "messages"
		}
		return invalid(param, "The '%s' model does not accept image input; it takes only %s.",
			m.Slug, quoteList(m.Modalities))
	}
	if tiers := m.tiers(); c.tier == "priority" && tiers != nil && !slices.Contains(tiers, c.tier) {
		return invalid("service_tier", "Unsupported value: 'priority' is not supported with the '%s' model. "+
			"Supported values are: %s.", m.Slug, quoteList(append(tiers, "default")))
	}
	return nil
}

// quoteList writes 'a', 'b' and 'c', as the backend's own messages list values.
func quoteList(vs []string) string {
	q := make([]string, len(vs))
	for i, v := range vs {
		q[i] = "'" + v + "'"
	}
	if len(q) < 2 {
		return strings.Join(q, "")
	}
	return strings.Join(q[:len(q)-1], ", ") + " and " + q[len(q)-1]
}

// event is one backend SSE event, decoded once; the turn and every renderer read this value.
type event struct {
	typ  string // the SSE event name, else the JSON "type"
	data []byte // the event as received, relayed to native clients; valid until the next read
	ok   bool   // data is a JSON object

	Type         string          `json:"type"`
	ItemID       string          `json:"item_id"`
	OutputIndex  int             `json:"output_index"`
	SummaryIndex int             `json:"summary_index"`
	ContentIndex int             `json:"content_index"`
	Delta        string          `json:"delta"`
	Item         json.RawMessage `json:"item"`
	Response     json.RawMessage `json:"response"`
	Code         string          `json:"code"`
	Message      string          `json:"message"`
	Error        *backendError   `json:"error"`
}

// decode sets ev to one SSE event. The Codex CLI accepts data-only events named by their
// JSON "type" as well as named ones, so both are read. Deltas are most of a stream, so their
// flat shape is scanned in place first (scanDelta); anything else goes to encoding/json.
func (ev *event) decode(name, data []byte) {
	*ev = event{typ: string(name), data: data, ok: true}
	if bytes.HasSuffix(name, []byte(".delta")) {
		id, delta, idx, ok := scanDelta(data)
		if ok && bytes.IndexByte(delta, '\\') < 0 {
			ev.Delta = string(delta[1 : len(delta)-1])
		} else if ok && json.Unmarshal(delta, &ev.Delta) != nil {
			ok = false
		}
		if ok {
			ev.ItemID, ev.ContentIndex = string(id), idx
			if bytes.Contains(name, []byte("summary")) {
				ev.SummaryIndex, ev.ContentIndex = idx, 0
			}
			return
		}
	}
	err := json.Unmarshal(data, ev)
	_, typeErr := errors.AsType[*json.UnmarshalTypeError](err)
	ev.ok = err == nil || typeErr
	ev.typ = cmp.Or(ev.typ, ev.Type)
}

// scanDelta finds the item_id, the delta (quoted, still escaped) and the summary_index or
// content_index of a delta event without allocating. It knows only the compact, flat shape
// the backend sends: ok is false for anything else (space, escaped keys, values of other
// types, nested values with commas, bad syntax), and the caller then asks encoding/json.
func scanDelta(data []byte) (id, delta []byte, idx int, ok bool) {
	if len(data) < 2 || data[0] != '{' || data[len(data)-1] != '}' {
		return
	}
	for i := 1; ; {
		end := stringEnd(data, i)
		if end < 0 || end == len(data) || data[end] != ':' || bytes.IndexByte(data[i:end], '\\') >= 0 {
			return
		}
		key, v := string(data[i+1:end-1]), end+1
		if end = stringEnd(data, v); end < 0 { // not a string: a number, literal or [] (no strings)
			for end = v; end < len(data) && strings.IndexByte(`,}"`, data[end]) < 0; end++ {
			}
		}
		switch {
		case end >= len(data) || data[end] != ',' && end != len(data)-1:
			return
		case key == "item_id" && (data[v] != '"' || bytes.IndexByte(data[v:end], '\\') >= 0),
			key == "delta" && data[v] != '"':
			return
		case key == "item_id":
			id = data[v+1 : end-1]
		case key == "delta":
			delta = data[v:end]
		case key == "summary_index" || key == "content_index":
			n, err := strconv.Atoi(string(data[v:end]))
			if err != nil {
				return
			}
			idx = n
		}
		if end == len(data)-1 {
			return id, delta, idx, delta != nil
		}
		i = end + 1
	}
}

// stringEnd is the index after the JSON string that starts at data[i], or -1.
func stringEnd(data []byte, i int) int {
	if i >= len(data) || data[i] != '"' {
		return -1
	}
	for i++; i < len(data); i++ {
		switch data[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return -1
}

type backendError struct{ Type, Code, Message string }

// tokenUsage is the backend's token usage; the details may be null, which leaves them zero.
type tokenUsage struct {
	InputTokens        int `json:"input_tokens"`
	OutputTokens       int `json:"output_tokens"`
	TotalTokens        int `json:"total_tokens"`
	InputTokensDetails struct {
		CachedTokens int `json:"cached_tokens"`
	} `json:"input_tokens_details"`
	OutputTokensDetails struct {
		ReasoningTokens int `json:"reasoning_tokens"`
	} `json:"output_tokens_details"`
}

type backendResponse struct {
	ID                string                  `json:"id"`
	Output            []json.RawMessage       `json:"output"`
	Usage             tokenUsage              `json:"usage"`
	Error             *backendError           `json:"error"`
	IncompleteDetails struct{ Reason string } `json:"incomplete_details"`
}

type outputItem struct {
	Type, ID, Name, Arguments string
	CallID                    string `json:"call_id"`
	Content, Summary          []struct{ Text, Refusal string }
	Encrypted                 string `json:"encrypted_content"`
}

type pieceKind int

const (
	pieceText      pieceKind = iota // answer text
	pieceReasoning                  // reasoning summary or text
	pieceCall                       // a function call starts: id, name, first arguments
	pieceArgs                       // more arguments of call
	pieceSignature                  // a reasoning item's encrypted content, when it is complete
)

// piece is a bit of the reply as it grows, the same for every client API.
type piece struct {
	kind   pieceKind
	item   string // the output item's id
	part   int    // reasoning: which part of the item (a new part is a new paragraph)
	text   string // the text, reasoning or arguments
	call   int    // calls: the call's place among the reply's calls
	callID string
	name   string
}

// turn is what one backend stream said, and the only copy of the reply: the session saves it
// and every renderer reads it. add is its only writer.
type turn struct {
	id         string            // the response id
	items      []json.RawMessage // the reply's output items, in output_index order
	response   json.RawMessage   // the response object of the terminal event
	usage      tokenUsage
	incomplete string // incomplete_details.reason
	err        error  // from response.failed or an error event
	done       bool   // a terminal event arrived: nothing follows
	began      bool   // output has reached the renderer: the turn cannot be tried again

	indexes  []int       // output_index of each item that came by output_item.done
	streamed []string    // ids of items whose content came as deltas
	calls    []callState // the reply's function calls so far
	p        piece       // the piece being emitted
}

// emit passes p to emit through t.p, so that emitting costs no allocation.
func (t *turn) emit(emit func(*piece), p piece) {
	t.p = p
	emit(&t.p)
}

type callState struct {
	itemID, callID string // deltas name the item (fc_…), not the call
	argsSent       bool
}

func (t *turn) add(ev *event, emit func(*piece)) {
	switch ev.typ {
	case "response.output_text.delta":
		t.mark(ev.ItemID)
		t.emit(emit, piece{kind: pieceText, item: ev.ItemID, text: ev.Delta})
	case "response.reasoning_summary_text.delta":
		t.mark(ev.ItemID)
		t.emit(emit, piece{kind: pieceReasoning, item: ev.ItemID, part: ev.SummaryIndex, text: ev.Delta})
	case "response.reasoning_text.delta": // raw reasoning: parts apart from the summary's
		t.mark(ev.ItemID)
		t.emit(emit, piece{kind: pieceReasoning, item: ev.ItemID, part: -1 - ev.ContentIndex, text: ev.Delta})
	case "response.function_call_arguments.delta":
		if i := t.call(ev.ItemID, ""); i >= 0 {
			t.calls[i].argsSent = true
			t.emit(emit, piece{kind: pieceArgs, call: i, text: ev.Delta})
		}
	case "response.output_item.added":
		var it outputItem
		if json.Unmarshal(ev.Item, &it) == nil && it.Type == "function_call" {
			t.newCall(&it, emit)
		}
	case "response.output_item.done":
		if len(ev.Item) == 0 {
			return
		}
		i, _ := slices.BinarySearch(t.indexes, ev.OutputIndex+1) // after equal indexes: arrival order
		t.indexes = slices.Insert(t.indexes, i, ev.OutputIndex)
		t.items = slices.Insert(t.items, i, ev.Item)
		t.itemDone(ev.Item, emit)
	case "response.completed", "response.done", "response.incomplete":
		// Codex knows only response.completed; peers accept response.done, and the Responses
		// API has response.incomplete.
		if ev.ok {
			t.finish(ev.Response, emit)
		}
	case "response.failed", "error":
		t.err = ev.failure()
	}
}

// finish ends the turn with the terminal response. Its output is the reply when it has one;
// when it is empty (the Codex CLI's own fixtures send "output":[]) the streamed items are.
func (t *turn) finish(raw json.RawMessage, emit func(*piece)) {
	var r backendResponse
	_ = json.Unmarshal(raw, &r) // absent or garbled: the streamed items still count
	t.done, t.response, t.id = true, raw, r.ID
	t.usage, t.incomplete = r.Usage, r.IncompleteDetails.Reason
	if len(r.Output) > 0 {
		t.items = r.Output
	}
	if len(t.indexes) == 0 { // no item came by output_item.done: none reached the client yet
		for _, raw := range t.items {
			t.itemDone(raw, emit)
		}
	}
}

func (t *turn) mark(id string) {
	if !slices.Contains(t.streamed, id) {
		t.streamed = append(t.streamed, id)
	}
}

func (t *turn) call(itemID, callID string) int {
	return slices.IndexFunc(t.calls, func(c callState) bool {
		return c.itemID == itemID && itemID != "" || c.callID == callID && callID != ""
	})
}

func (t *turn) newCall(it *outputItem, emit func(*piece)) {
	t.calls = append(t.calls, callState{it.ID, it.CallID, it.Arguments != ""})
	t.emit(emit, piece{kind: pieceCall, item: it.ID, call: len(t.calls) - 1, text: it.Arguments,
		callID: it.CallID, name: it.Name})
}

// itemDone emits what a finished item holds that its deltas did not deliver: the whole text
// or reasoning of a stream without deltas, a call never announced, or arguments that never
// came as deltas.
func (t *turn) itemDone(raw json.RawMessage, emit func(*piece)) {
	var it outputItem
	if json.Unmarshal(raw, &it) != nil {
		return
	}
	defer func() {
		if it.Type == "reasoning" && it.Encrypted != "" {
			t.emit(emit, piece{kind: pieceSignature, item: it.ID, text: it.Encrypted})
		}
	}()
	if it.ID != "" && slices.Contains(t.streamed, it.ID) {
		return
	}
	switch it.Type {
	case "message":
		var b strings.Builder
		for _, p := range it.Content {
			b.WriteString(p.Text + p.Refusal)
		}
		if b.Len() > 0 {
			t.emit(emit, piece{kind: pieceText, item: it.ID, text: b.String()})
		}
	case "reasoning":
		for i, p := range slices.Concat(it.Content, it.Summary) {
			t.emit(emit, piece{kind: pieceReasoning, item: it.ID, part: 1<<20 + i, text: p.Text})
		}
	case "function_call":
		i := t.call(it.ID, it.CallID)
		if i < 0 {
			t.newCall(&it, emit)
		} else if !t.calls[i].argsSent && it.Arguments != "" {
			t.calls[i].argsSent = true
			t.emit(emit, piece{kind: pieceArgs, call: i, text: it.Arguments})
		}
	}
}

func (ev *event) failure() error {
	e := cmp.Or(ev.Error, &backendError{Code: ev.Code, Message: ev.Message})
	var r backendResponse
	if json.Unmarshal(ev.Response, &r) == nil && r.Error != nil {
		e = r.Error
	}
	return failureError(cmp.Or(e.Code, e.Type), e.Message)
}

// failureError is the error of a backend failure code, keeping the backend's message. The
// Codex CLI treats context_length_exceeded as the caller's fault and the quota codes as limits
// (codex-rs/codex-api/src/sse/responses.rs).
func failureError(code, message string) error {
	e := &apiError{kind: errBackend, code: code,
		msg: cmp.Or(message, "upstream response failed ("+cmp.Or(code, "no code")+")")}
	switch code {
	case "context_length_exceeded":
		e.kind = errInvalid
	case "rate_limit_exceeded", "insufficient_quota", "usage_not_included", "usage_limit_reached":
		e.kind = errLimited
	case "server_is_overloaded", "slow_down":
		e.kind = errUnavailable
	}
	if e.kind == errUnavailable || code == "rate_limit_exceeded" {
		// "Please try again in 11.054s." (codex-rs/codex-api/src/sse/responses.rs reads it alike)
		wait := 1.0
		if m := retryIn.FindStringSubmatch(message); m != nil {
			wait, _ = strconv.ParseFloat(m[1], 64)
			if m[2] == "ms" {
				wait /= 1000
			}
		}
		e.header = http.Header{"Retry-After": {strconv.Itoa(int(math.Ceil(max(wait, 1))))}}
	}
	return e
}

var retryIn = regexp.MustCompile(`(?i)try again in\s*(\d+(?:\.\d+)?)\s*(s|ms|seconds?)\b`)

func (t *turn) finishReason(toolCalls bool) string {
	switch {
	case toolCalls:
		return "tool_calls"
	case t.incomplete == "max_output_tokens":
		return "length"
	case t.incomplete == "content_filter":
		return t.incomplete
	}
	return "stop"
}

// paragraphs joins reasoning as it arrives: a new part, or a part of another item, starts a
// new paragraph.
type paragraphs struct {
	item  string
	part  int
	begun bool
}

// sep is what goes before p's text: a blank line when it starts a new part.
func (g *paragraphs) sep(p *piece) string {
	sep := ""
	if g.begun && (p.item != g.item || p.part != g.part) {
		sep = "\n\n"
	}
	g.item, g.part, g.begun = p.item, p.part, true
	return sep
}

// collect passes the pieces of a finished turn's items to emit, as if each came whole.
func collect(t *turn, emit func(*piece)) {
	var u turn
	for _, raw := range t.items {
		u.itemDone(raw, emit)
	}
}

func answerText(t *turn) string {
	var b strings.Builder
	collect(t, func(p *piece) {
		if p.kind == pieceText {
			b.WriteString(p.text)
		}
	})
	return b.String()
}

// chatHead is a chat.completion or chat.completion.chunk up to its choices.
func chatHead(object, id string, created int64, model string) []byte {
	return fmt.Appendf(nil, `{"id":%s,"object":"%s","created":%d,"model":%s,"choices":[`,
		marshal(id), object, created, marshal(model))
}

func chatUsage(u tokenUsage) []byte {
	return fmt.Appendf(nil, `{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d,`+
		`"prompt_tokens_details":{"cached_tokens":%d},"completion_tokens_details":{"reasoning_tokens":%d}}`,
		u.InputTokens, u.OutputTokens, cmp.Or(u.TotalTokens, u.InputTokens+u.OutputTokens),
		u.InputTokensDetails.CachedTokens, u.OutputTokensDetails.ReasoningTokens)
}

// chatToolCall is a tool call of a chat message, or the start of one in a chunk.
type chatToolCall struct {
	Index    *int   `json:"index,omitempty"`
	ID       string `json:"id"`
	Type     string `json:"type"`
	Function struct {
		Name      string `json:"name"`
		Arguments string `json:"arguments"`
	} `json:"function"`
}

func newToolCall(p *piece) chatToolCall {
	tc := chatToolCall{ID: p.callID, Type: "function"}
	tc.Function.Name, tc.Function.Arguments = p.name, p.text
	return tc
}

// chatCompletion builds the chat.completion of a finished turn. Unlike the stream, which cannot
// take back tags it already sent, it has no tags when the turn calls tools.
func chatCompletion(t *turn, id string, created int64, model string, mode reasoningMode,
	jsonMode bool) []byte {
	var m struct {
		Role             string         `json:"role"`
		Content          *string        `json:"content"`
		ReasoningContent string         `json:"reasoning_content,omitempty"`
		ToolCalls        []chatToolCall `json:"tool_calls,omitempty"`
	}
	var text, reasoning strings.Builder
	var g paragraphs
	collect(t, func(p *piece) {
		switch p.kind {
		case pieceText:
			text.WriteString(p.text)
		case pieceReasoning:
			if mode != reasoningNone {
				reasoning.WriteString(g.sep(p) + p.text)
			}
		case pieceCall:
			m.ToolCalls = append(m.ToolCalls, newToolCall(p))
		case pieceArgs:
			m.ToolCalls[p.call].Function.Arguments += p.text
		}
	})
	out, calls := text.String(), len(m.ToolCalls) > 0
	m.Role, m.ReasoningContent = "assistant", reasoning.String()
	if mode == reasoningTags && !jsonMode && !calls && m.ReasoningContent != "" && out != "" {
		out = "<reasoning>" + m.ReasoningContent + "</reasoning>\n\n" + out
	}
	if out != "" || !calls {
		m.Content = &out
	}
	return fmt.Appendf(chatHead("chat.completion", id, created, model),
		`{"index":0,"message":%s,"finish_reason":"%s"}],"usage":%s}`,
		marshal(m), t.finishReason(calls), chatUsage(t.usage))
}

// chatStream turns the pieces of a reply into chat.completion.chunk payloads as they arrive.
// Deltas are most of a stream, so chunks are written from a template rather than by
// encoding/json, which took a third of the proxy's CPU per delta.
type chatStream struct {
	head     []byte // every chunk up to `"choices":[`
	mode     reasoningMode
	emit     func([]byte) // must not keep the slice
	roleSent bool
	tagsDone bool            // the reasoning tags were sent, or will never be
	tags     strings.Builder // reasoning held back for the tags until the answer starts
	calls    int
	g        paragraphs
	buf, d   []byte // reused for the chunk and its delta
}

func newChatStream(id string, created int64, model string, mode reasoningMode, jsonMode bool,
	emit func([]byte)) *chatStream {
	return &chatStream{head: chatHead("chat.completion.chunk", id, created, model), mode: mode, emit: emit,
		tagsDone: mode != reasoningTags || jsonMode}
}

// send emits one chunk with the delta d and a finish_reason (null when empty). The role goes
// first, in a chunk of its own, once there is something to say.
func (s *chatStream) send(d []byte, finish string) {
	if !s.roleSent {
		s.roleSent = true
		s.send([]byte(`{"role":"assistant","content":""}`), "")
	}
	s.buf = append(append(append(s.buf[:0], s.head...), `{"index":0,"delta":`...), d...)
	if finish == "" {
		s.buf = append(s.buf, `,"finish_reason":null}]}`...)
	} else {
		s.buf = append(append(append(s.buf, `,"finish_reason":"`...), finish...), `"}]}`...)
	}
	s.emit(s.buf)
}

func (s *chatStream) text(key, pre, text string) {
	s.d = append(append(append(s.d[:0], `{"`...), key...), `":"`...)
	s.d = append(appendEscaped(appendEscaped(s.d, pre), text), `"}`...)
	s.send(s.d, "")
}

func (s *chatStream) piece(p *piece) {
	switch p.kind {
	case pieceText:
		if !s.tagsDone && s.tags.Len() > 0 {
			s.text("content", "<reasoning>"+s.tags.String()+"</reasoning>\n\n", "")
		}
		s.tagsDone = true
		s.text("content", "", p.text)
	case pieceReasoning:
		if s.mode == reasoningNone {
			return
		}
		sep := s.g.sep(p)
		if !s.tagsDone {
			s.tags.WriteString(sep + p.text)
		}
		s.text("reasoning_content", sep, p.text)
	case pieceCall: // the turn goes to tool calls: no tags
		s.tagsDone = true
		s.calls++
		tc := newToolCall(p)
		tc.Index = &p.call
		s.send(fmt.Appendf(s.d[:0], `{"tool_calls":[%s]}`, marshal(tc)), "")
	case pieceArgs:
		s.d = strconv.AppendInt(append(s.d[:0], `{"tool_calls":[{"index":`...), int64(p.call), 10)
		s.d = append(appendEscaped(append(s.d, `,"function":{"arguments":"`...), p.text), `"}}]}`...)
		s.send(s.d, "")
	}
}

func (s *chatStream) finish(t *turn, includeUsage bool) {
	s.send([]byte("{}"), t.finishReason(s.calls > 0))
	if includeUsage {
		s.emit(fmt.Appendf(s.buf[:0], `%s],"usage":%s}`, s.head, chatUsage(t.usage)))
	}
}

// appendEscaped appends s escaped for the inside of a JSON string, byte for byte as
// encoding/json does without HTML escaping: short escapes, \u00XX for other control
// characters, \u2028 and \u2029 (JavaScript line terminators), U+FFFD for invalid UTF-8.
func appendEscaped(dst []byte, s string) []byte {
	const hex = "0123456789abcdef"
	start := 0
	for i := 0; i < len(s); {
		c, size := rune(s[i]), 1
		if c >= utf8.RuneSelf {
			c, size = utf8.DecodeRuneInString(s[i:])
		}
		if c >= 0x20 && c != '"' && c != '\\' && c != '\u2028' && c != '\u2029' &&
			(c != utf8.RuneError || size > 1) {
			i += size
			continue
		}
		dst = append(dst, s[start:i]...)
		if k := strings.IndexRune("\"\\\b\f\n\r\t", c); k >= 0 {
			dst = append(dst, '\\', `"\bfnrt`[k])
		} else {
			dst = append(dst, '\\', 'u', hex[c>>12], hex[c>>8&0xf], hex[c>>4&0xf], hex[c&0xf])
		}
		i += size
		start = i
	}
	return append(dst, s[start:]...)
}

// anthropicStream writes a turn as the Anthropic Messages stream. A thinking block ends with the
// reasoning's encrypted content as its signature, so a client that sends it back continues the
// backend's reasoning. Tool uses are sent whole at the end: their arguments may arrive
// interleaved, and a block cannot be reopened.
type anthropicStream struct {
	id, model string
	emit      func(name string, data []byte)
	started   bool
	blocks    int    // blocks started so far
	open      string // the open block's type, "" when none
	item      string // the open block's item
	g         paragraphs
	calls     []chatToolCall
}

func (s *anthropicStream) send(name string, fields map[string]any) {
	fields["type"] = name
	s.emit(name, marshal(fields))
}

func (s *anthropicStream) begin() {
	if !s.started {
		s.started = true
		s.send("message_start", map[string]any{"message": map[string]any{"id": s.id,
			"type": "message", "role": "assistant", "model": s.model, "content": []any{},
			"stop_reason": nil, "stop_sequence": nil,
			"usage": map[string]int{"input_tokens": 0, "output_tokens": 0}}})
	}
}

// block makes cb, of item, the open block unless it is already.
func (s *anthropicStream) block(cb map[string]any, item string) {
	if s.begin(); s.open == cb["type"] && s.item == item {
		return
	}
	s.stop()
	s.open, s.item, s.g = cb["type"].(string), item, paragraphs{}
	s.send("content_block_start", map[string]any{"index": s.blocks, "content_block": cb})
	s.blocks++
}

func (s *anthropicStream) stop() {
	if s.open != "" {
		s.send("content_block_stop", map[string]any{"index": s.blocks - 1})
		s.open = ""
	}
}

func (s *anthropicStream) delta(d map[string]any) {
	s.send("content_block_delta", map[string]any{"index": s.blocks - 1, "delta": d})
}

func (s *anthropicStream) piece(p *piece) {
	switch p.kind {
	case pieceText:
		s.block(map[string]any{"type": "text", "text": ""}, p.item)
		s.delta(map[string]any{"type": "text_delta", "text": p.text})
	case pieceReasoning:
		s.block(map[string]any{"type": "thinking", "thinking": "", "signature": ""}, p.item)
		s.delta(map[string]any{"type": "thinking_delta", "thinking": s.g.sep(p) + p.text})
	case pieceSignature:
		if s.open == "thinking" && s.item == p.item {
			s.delta(map[string]any{"type": "signature_delta", "signature": p.text})
		}
	case pieceCall:
		s.calls = append(s.calls, newToolCall(p))
	case pieceArgs:
		s.calls[p.call].Function.Arguments += p.text
	}
}

func (s *anthropicStream) finish(t *turn) {
	stop := "end_turn"
	if t.incomplete == "max_output_tokens" {
		stop = "max_tokens"
	}
	for _, c := range s.calls {
		stop = "tool_use"
		s.block(map[string]any{"type": "tool_use", "id": c.ID, "name": c.Function.Name,
			"input": map[string]any{}}, c.ID)
		args := cmp.Or(c.Function.Arguments, "{}")
		s.delta(map[string]any{"type": "input_json_delta", "partial_json": args})
	}
	s.begin()
	s.stop()
	u, cached := t.usage, t.usage.InputTokensDetails.CachedTokens
	s.send("message_delta", map[string]any{"delta": map[string]any{"stop_reason": stop, "stop_sequence": nil},
		"usage": map[string]int{"input_tokens": u.InputTokens - cached, "output_tokens": u.OutputTokens,
			"cache_read_input_tokens": cached}})
	s.send("message_stop", map[string]any{})
}

// anthropicMessage is the Messages API answer of a finished turn, for a client that does not
// stream: the events of the stream, folded into the message they describe.
func anthropicMessage(t *turn, id, model string) []byte {
	var msg map[string]any
	var blocks []map[string]any
	s := &anthropicStream{id: id, model: model, emit: func(name string, data []byte) {
		var ev struct {
			Message map[string]any `json:"message"`
			Block   map[string]any `json:"content_block"`
			Delta   map[string]any `json:"delta"`
			Usage   map[string]any `json:"usage"`
		}
		json.Unmarshal(data, &ev)
		switch name {
		case "message_start":
			msg = ev.Message
		case "content_block_start":
			blocks = append(blocks, ev.Block)
		case "content_block_delta":
			b := blocks[len(blocks)-1]
			for k, v := range ev.Delta {
				if prev, _ := b[k].(string); k != "type" {
					b[k] = prev + v.(string)
				}
			}
		case "message_delta":
			msg["stop_reason"], msg["usage"] = ev.Delta["stop_reason"], ev.Usage
		}
	}}
	collect(t, s.piece)
	s.finish(t)
	for _, b := range blocks {
		if args, ok := b["partial_json"].(string); ok {
			delete(b, "partial_json")
			b["input"] = json.RawMessage(args)
			if !json.Valid(b["input"].(json.RawMessage)) {
				b["input"] = map[string]any{}
			}
		}
	}
	msg["content"] = blocks
	return marshal(msg)
}

// responseObject is the Responses API object of a finished turn and, when c is not nil, what
// the OpenAI API echoes of the request that the backend does not see (previous_response_id,
// store) or sees otherwise (instructions, tools).
func responseObject(t *turn, c *call) []byte {
	var o object
	if json.Unmarshal(t.response, &o) != nil || o == nil {
		o = object{"object": json.RawMessage(`"response"`)}
	}
	items := t.items
	if items == nil {
		items = []json.RawMessage{}
	}
	o["output"], o["output_text"] = marshal(items), marshal(answerText(t))
	if c != nil {
		o["previous_response_id"], o["store"] = json.RawMessage("null"), marshal(c.store == nil || *c.store)
		if c.previousID != "" {
			o["previous_response_id"] = marshal(c.previousID)
		}
		o["instructions"], o["tool_choice"] = marshal(c.instructions), c.toolChoice
		o["tools"] = json.RawMessage("[]")
		if c.tools != nil {
			o["tools"] = marshal(c.tools)
		}
		o["parallel_tool_calls"] = marshal(c.parallel == nil || *c.parallel)
	}
	return marshal(o)
}
