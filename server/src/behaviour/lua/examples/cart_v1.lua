-- cart, version 1: a shopping cart as a statehouse Lua behaviour.
--
-- State:  { items = { [sku] = { qty = n, price = p } }, status = "open" | "checked_out",
--           checked_out_at = ms }
-- Calls:  { op = "add", sku = "apple", price = 0.5, qty = 2 } -> { sku, qty }  (qty: 1)
--         { op = "remove", sku = "apple", qty = 1 }          -> { sku, qty }  (qty: all)
--         { op = "total" }                                   -> { total, count }
--         { op = "checkout" }                                -> { total, count, at }
-- Casts:  the same messages, without a reply.
-- Anything else is refused with error({ invalid = reason }): the caller gets
-- INVALID_ARGUMENT and nothing changes.
--
-- The handlers decide and emit events; `apply` folds an event into the state, for live turns
-- and for replay alike, so it must depend on nothing but its arguments.

local function total(items)
    local sum, count = 0, 0
    for _, item in pairs(items) do
        sum += item.qty * item.price
        count += item.qty
    end
    return sum, count
end

local function positive_integer(value, name)
    if value == nil then
        return nil
    end
    if type(value) ~= "number" or value < 1 or value % 1 ~= 0 then
        error({ invalid = name .. " must be a positive integer" })
    end
    return value
end

function init(key, arg)
    return { items = {}, status = "open" }
end

function handle_call(msg, state, ctx)
    local op = msg.op
    if op == "total" then
        local sum, count = total(state.items)
        return { total = sum, count = count }
    end
    if state.status ~= "open" then
        error({ invalid = "the cart is checked out" })
    end
    if op == "add" then
        if type(msg.sku) ~= "string" or msg.sku == "" then
            error({ invalid = "add needs a sku" })
        end
        if type(msg.price) ~= "number" or msg.price < 0 then
            error({ invalid = "add needs a price >= 0" })
        end
        local qty = positive_integer(msg.qty, "qty") or 1
        ctx.emit({ type = "added", sku = msg.sku, qty = qty, price = msg.price })
        local current = state.items[msg.sku]
        return { sku = msg.sku, qty = (if current then current.qty else 0) + qty }
    elseif op == "remove" then
        local item = state.items[msg.sku]
        if item == nil then
            error({ invalid = "no such item: " .. tostring(msg.sku) })
        end
        local qty = math.min(positive_integer(msg.qty, "qty") or item.qty, item.qty)
        ctx.emit({ type = "removed", sku = msg.sku, qty = qty })
        return { sku = msg.sku, qty = item.qty - qty }
    elseif op == "checkout" then
        local sum, count = total(state.items)
        if count == 0 then
            error({ invalid = "the cart is empty" })
        end
        ctx.emit({ type = "checked_out", at = ctx.now })
        return { total = sum, count = count, at = ctx.now }
    end
    error({ invalid = "unknown op: " .. tostring(op) })
end

function handle_cast(msg, state, ctx)
    handle_call(msg, state, ctx)
end

function apply(state, event)
    if event.type == "added" then
        local item = state.items[event.sku]
        if item then
            item.qty += event.qty
            item.price = event.price
        else
            state.items[event.sku] = { qty = event.qty, price = event.price }
        end
    elseif event.type == "removed" then
        local item = state.items[event.sku]
        item.qty -= event.qty
        if item.qty <= 0 then
            state.items[event.sku] = nil
        end
    elseif event.type == "checked_out" then
        state.status = "checked_out"
        state.checked_out_at = event.at
    end
    return state
end
