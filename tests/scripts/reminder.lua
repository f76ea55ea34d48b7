-- reminder: durable effects from Lua. Sets timers, sends casts to counters and asks them.
function init(key, arg)
    return { fired = array(), replies = array() }
end

function handle_call(msg, state, ctx)
    if msg.op == "remind" then
        ctx.set_timer("remind", msg.after_ms, { note = msg.note })
        return "scheduled"
    elseif msg.op == "notify" then
        ctx.send("counter", msg.to, { op = "incr" })
        return "sent"
    elseif msg.op == "ask" then
        ctx.request("counter", msg.to, { op = "get" }, msg.tag)
        return "asked"
    elseif msg.op == "get" then
        return state
    end
    error({ invalid = "unknown op: " .. tostring(msg.op) })
end

function handle_info(info, state, ctx)
    if info.info == "timer" then
        ctx.emit({ fired = info.payload.note })
    elseif info.info == "reply" then
        ctx.emit({ reply = info.reply, tag = info.tag })
    end
    return nil
end

function apply(state, event)
    if event.fired then
        table.insert(state.fired, event.fired)
    else
        table.insert(state.replies, { tag = event.tag, reply = event.reply })
    end
    return state
end
