"use client";
// useChat talks to streamgate's AI SDK endpoint (/api/v1/chat), proxied by next.config.mjs.
import { useChat } from "@ai-sdk/react";
import { DefaultChatTransport } from "ai";
import { useState } from "react";

const transport = new DefaultChatTransport({ api: "/api/v1/chat", body: { max_tokens: 256 } });

export default function Page() {
  const { messages, sendMessage, status, error } = useChat({ transport });
  const [input, setInput] = useState("");
  return (
    <main>
      <h1>Chat</h1>
      {messages.map((m) => (
        <p key={m.id}>
          <b>{m.role}:</b> {m.parts.map((p, i) => (p.type === "text" ? <span key={i}>{p.text}</span> : null))}
        </p>
      ))}
      {error && <p style={{ color: "crimson" }}>{error.message}</p>}
      <form
        onSubmit={(e) => {
          e.preventDefault();
          if (input.trim()) sendMessage({ text: input });
          setInput("");
        }}
      >
        <input value={input} onChange={(e) => setInput(e.target.value)} disabled={status !== "ready"} />
        <button type="submit" disabled={status !== "ready"}>Send</button>
      </form>
    </main>
  );
}
